"""Checkpoints to resume from: find the newest one in an output folder and check it is intact before loading it.

A run killed while writing a checkpoint (or a disk that filled up) leaves a folder that `Trainer` would fail to load
deep inside safetensors or json, or worse load half of. `resolve_resume_checkpoint` checks the files a resume reads
(`trainer_state.json`, the weights, the optimizer/scheduler/RNG state) cheaply, without loading tensors, and names
the newest intact checkpoint when the requested one is not.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and the newest intact one."""


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated write fails this)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name} is truncated ({size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise CheckpointError(f"{path.name} is truncated (header of {header_size} bytes, file of {size})")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            raise CheckpointError(f"{path.name} has a corrupt header") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        raise CheckpointError(f"{path.name} is truncated ({size} of {expected} bytes)")


def _check_torch_file(path: Path) -> None:
    """A `torch.save` file is a zip archive; a truncated one has no readable central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path.name} is truncated or corrupt") from None


def _check_file(path: Path) -> None:
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        _check_torch_file(path)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` (naming the file and why) unless `path` holds a loadable checkpoint.

    Checks `trainer_state.json` (valid JSON with a `global_step`), the model or adapter weights (every shard of a
    sharded checkpoint), and the optimizer/scheduler/scaler/RNG files that are present.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    state = folder / "trainer_state.json"
    try:
        if "global_step" not in json.loads(state.read_text()):
            raise CheckpointError("trainer_state.json has no `global_step`")
    except FileNotFoundError:
        raise CheckpointError("trainer_state.json is missing") from None
    except ValueError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError("trainer_state.json is not valid JSON") from None

    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    for index_name in _INDEXES:
        if (folder / index_name).is_file():
            try:
                shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
            except (ValueError, KeyError):
                raise CheckpointError(f"{index_name} is corrupt") from None
            missing = sorted(shard for shard in shards if not (folder / shard).is_file())
            if missing:
                raise CheckpointError(f"{index_name} lists missing shards {missing}")
            weights += [folder / shard for shard in sorted(shards)]
    deepspeed = any(child.is_dir() and child.name.startswith("global_step") for child in folder.iterdir())
    if not weights and not deepspeed:
        raise CheckpointError(f"no model weights ({', '.join(_WEIGHTS)} or a sharded index)")
    others = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".pt", ".pth") and p not in weights]
    for file in [*weights, *sorted(others)]:
        _check_file(file)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), child) for child in folder.iterdir() if (match := _CHECKPOINT.match(child.name))]
    return [child for _, child in sorted(found, reverse=True) if child.is_dir()]


def newest_intact_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of `output_dir` that passes `verify_checkpoint`, or None."""
    for checkpoint in list_checkpoints(output_dir):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError:
            continue
        return checkpoint
    return None


def resolve_resume_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: bool | str | None) -> str | None:
    """The checkpoint folder to resume from, checked; None to start fresh.

    `resume_from_checkpoint` is `Trainer.train`'s argument: a path, or True / "last" / "true" for the newest
    checkpoint of `output_dir`. A corrupt checkpoint raises `CheckpointError` naming it and the newest intact one.
    """
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last"):
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise CheckpointError(f"resume_from_checkpoint: no checkpoint-N folder in {output_dir} to resume from.")
        requested = checkpoints[0]
    else:
        requested = Path(resume_from_checkpoint)
    try:
        verify_checkpoint(requested)
    except CheckpointError as error:
        intact = newest_intact_checkpoint(requested.parent)
        fallback = (
            f"the newest intact checkpoint is {intact}: resume with --resume_from_checkpoint {intact}"
            if intact is not None
            else f"no intact checkpoint in {requested.parent}"
        )
        raise CheckpointError(f"Cannot resume from {requested}: {error}; {fallback}.") from None
    return str(requested)
