"""Where models and data come from: local folders and files, or Hub ids, and the one-line errors for the ways they go
missing.

It imports the standard library and `trl_nca.cli_common` only (`huggingface_hub.constants`, `datasets` and
`transformers` inside the functions that need them), so that `trl-nca train` and `trl-nca generate` can check every
path before torch is imported:

- `check_local_path`: a model or dataset name that is a local path that does not exist, or a Hub id that cannot load
  (offline and not cached, or the Hub's host name does not resolve), is a `UsageError` naming the key, at once.
- `check_output_dir`: an `output_dir` that is a file, or below one.
- `hub_lookup`: a Hub look-up that fails anyway (no such repository, gated, no connection) becomes one line naming the
  key and the value, with the cause.
- `load_raw_datasets`: every dataset source `trl-nca train --dataset_name` and the prompts of `trl-nca generate` read;
  a data file that is not UTF-8 is a `DatasetError` naming the file and the offset of the first bad byte
  (`check_utf8`).
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trl_nca.cli_common import DatasetError, UsageError, did_you_mean

if TYPE_CHECKING:
    from datasets import DatasetDict, IterableDatasetDict

logger = logging.getLogger(__name__)

#: Data-file suffix -> the `datasets` builder that reads it.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

#: Data files read as text (UTF-8) by their builder.
TEXT_DATA_SUFFIXES = (".json", ".jsonl", ".csv")

#: What the one-line errors say about offline mode.
OFFLINE_RULE = "with HF_HUB_OFFLINE=1 only local paths and cached Hub ids load"

# A Hub repository id: `name` or `namespace/name`, [A-Za-z0-9_.-], at most 96 characters per part, no `--` or `..`,
# not starting or ending with `-` or `.`, not ending with `.git` (huggingface_hub's `validate_repo_id`).
_REPO_PART = r"(?![-.])[\w.-]{1,96}(?<![-.])"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}", re.ASCII)

#: A Hub id of the right kind for a key, in the errors.
_EXAMPLES = {
    "model": "mistralai/Mistral-7B-v0.1",
    "dataset": "trl-lib/ultrafeedback_binarized",
    "reward_funcs": "Skywork/Skywork-Reward-V2-Llama-3.1-8B",
}

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class DatasetSource(Protocol):
    """What `load_raw_datasets` reads: `NCAScriptArguments`, or any object with these attributes."""

    dataset_name: str | None
    dataset_config: str | None
    dataset_train_split: str
    dataset_streaming: bool


# ---------------------------------------------------------------------------------------------------------------------
# Checks before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a Hub repository id (`name` or `namespace/name`)."""
    return _REPO_ID.fullmatch(name) is not None and "--" not in name and ".." not in name and not name.endswith(".git")


def must_be_local(name: str) -> bool:
    """Whether `name` can only mean a local path: written as one (absolute, ``./``, ``../``, ``~``), not spelled like
    a Hub id (``runs/tiny/model``: ids have at most one ``/``), or ending in a data-file suffix (``.jsonl`` ...)."""
    return (
        os.path.isabs(name)
        or name in (".", "..")
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or not is_hub_id(name)
        or Path(name).suffix.lower() in DATA_FILE_BUILDERS
    )


def hub_offline(kind: str = "model") -> bool:
    """Whether the Hub is switched off (``HF_HUB_OFFLINE=1``) for loading a `kind` (``"model"`` or ``"dataset"``),
    as huggingface_hub (models) or datasets (datasets, where ``HF_DATASETS_OFFLINE`` takes precedence) read it."""
    from huggingface_hub import constants

    if kind == "dataset":
        if "datasets.config" in sys.modules:
            return bool(sys.modules["datasets.config"].HF_HUB_OFFLINE)
        if os.environ.get("HF_DATASETS_OFFLINE") is not None:
            return os.environ["HF_DATASETS_OFFLINE"].upper() in constants.ENV_VARS_TRUE_VALUES
    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def _resolves(host: str, timeout: float) -> bool | None:
    answer: dict[str, bool] = {}

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer["ok"] = True
        except OSError:  # socket.gaierror: no network, no DNS server, unknown host
            answer["ok"] = False

    thread = threading.Thread(target=resolve, name="trl-nca-hub-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer.get("ok")


def hub_reachable(timeout: float = 3.0) -> bool | None:
    """``False`` when the Hub's host name (``HF_ENDPOINT``) does not resolve, so any Hub download would fail after its
    retries; ``True`` when it resolves; ``None`` when it cannot be told (a proxy is set, or no answer within
    `timeout` seconds). The answer is kept for the life of the process."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    return _resolves(host, timeout) if host else None


def _hub_cache_has(name: str, kind: str, cache_dir: str | None = None) -> bool:
    """Whether the local cache holds something for the Hub id `name` that loading it offline could use: a
    ``models--NAMESPACE--NAME`` folder of the Hub cache for a model, a ``NAMESPACE___NAME`` folder of the datasets
    cache for a dataset (matched loosely: a false "yes" only defers the error to the loader)."""
    if kind == "dataset":
        if cache_dir:
            root = Path(cache_dir)
        elif "datasets.config" in sys.modules:
            root = Path(sys.modules["datasets.config"].HF_DATASETS_CACHE)
        elif os.environ.get("HF_DATASETS_CACHE"):
            root = Path(os.environ["HF_DATASETS_CACHE"])
        else:
            cache_home = os.environ.get("XDG_CACHE_HOME", "~/.cache")
            root = Path(os.environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")) / "datasets"
        root = root.expanduser()

        def loose(text: str) -> str:
            return re.sub(r"[_-]", "", text.lower())

        wanted = loose("___".join(name.split("/")))
        return root.is_dir() and any(loose(entry.name) == wanted for entry in root.iterdir())
    from huggingface_hub import constants

    folder = Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / f"models--{name.replace('/', '--')}"
    return (folder / "snapshots").is_dir()


def _sibling_hint(name: str) -> str:
    """`` (did you mean `data/train`?)`` from the entries of the folder `name` would be in, when that folder exists."""
    path = Path(name.rstrip("/\\") or name).expanduser()
    try:
        entries = [entry.name for entry in path.parent.iterdir()]
    except OSError:  # no such folder, or not readable
        return ""
    match = re.fullmatch(r" \(did you mean `(.*)`\?\)", did_you_mean(path.name, entries))
    if match is None:
        return ""
    parent = os.path.dirname(name.rstrip("/\\"))
    return f" (did you mean `{os.path.join(parent, match.group(1)) if parent else match.group(1)}`?)"


def _what(kind: str) -> str:
    return "folder or data file" if kind == "dataset" else "folder"


def check_local_path(value: str | None, key: str, kind: str = "model", cache_dir: str | None = None) -> None:
    """Check a model or dataset name before anything loads it; a name that cannot load is a one-line `UsageError`
    naming `key`, with the closest entry of its folder when there is one.

    - A name that can only be a local path (`must_be_local`) must exist: ``runs/tiny/modle``, ``./data``,
      ``rows.jsonl`` (a data file, or a glob that matches one).
    - A model given as a file, not a folder, or a folder without a `config.json` (nor a PEFT `adapter_config.json`),
      is refused.
    - Any other name is a Hub id, or a local path that does not exist (``data/trian``: the two cannot be told apart).
      With ``HF_HUB_OFFLINE=1`` it must be in the local cache (the Hub cache for a model, the datasets cache for a
      dataset; `cache_dir` when the load is given one). Online, when the Hub's host name does not resolve
      (`hub_reachable`), it must be in the cache too, or the download would only fail after minutes of retries.

    `kind` is ``"model"`` or ``"dataset"``. Nothing heavy is imported (huggingface_hub's constants only, for a Hub id).
    """
    if not value:
        return
    what = _what(kind)
    path = Path(value).expanduser()
    if path.exists():
        if kind == "model" and not path.is_dir():
            raise UsageError(f"{key}: {value} is a file; give the model's folder (the one holding config.json).")
        if kind == "model" and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise UsageError(
                f"{key}: the folder {value} holds no model (no config.json); give the folder `save_pretrained` wrote."
            )
        return
    if kind == "dataset" and glob.has_magic(value):
        if glob.glob(os.path.expanduser(value)):
            return
        raise UsageError(f"{key}: no data file matches {value}{_sibling_hint(value)}.")
    hint = _sibling_hint(value)
    if must_be_local(value):
        if kind == "dataset" and path.suffix.lower() in DATA_FILE_BUILDERS:
            raise UsageError(f"{key}: no data file matches {value}{hint}.")
        example = _EXAMPLES.get(key) or _EXAMPLES[kind]
        raise UsageError(
            f"{key}: the folder {value} does not exist{hint}; give a local {what}, or a Hub id such as `{example}`."
        )
    if hub_offline(kind):
        if not _hub_cache_has(value, kind, cache_dir):
            raise UsageError(
                f"{key}: {value} is neither a local {what}{hint} nor a Hub id in the local cache; {OFFLINE_RULE}."
            )
        return
    if hub_reachable() is False:
        if not _hub_cache_has(value, kind, cache_dir):
            raise UsageError(
                f"{key}: {value} is not a local {what}{hint}, and the Hub cannot be reached to look it up (its host "
                f"name does not resolve: no network?) nor is it in the local cache; {OFFLINE_RULE}."
            )
        logger.warning(
            "%s: the Hub cannot be reached; %s is loaded from the local cache once the download retries give up. Set "
            "HF_HUB_OFFLINE=1 to load it at once.",
            key,
            value,
        )


def check_train_sources(
    model: str | None,
    ref_model: str | None,
    dataset: str | None,
    output_dir: str | None,
    cache_dir: str | None = None,
    streaming: bool = False,
) -> None:
    """The checks `trl-nca train` runs before loading anything (the launcher from the recipe and flags, before torch
    is imported; the training script again, as the Python entry point): the policy, the reference, the dataset (and,
    unless it is streamed, that its local text files are UTF-8: `check_utf8`, remembered per file version) and the
    output folder (`check_local_path`, `check_output_dir`)."""
    if not model:
        raise UsageError("`model_name_or_path` is required (a Hub id or a local model folder).")
    check_local_path(model, "model_name_or_path", cache_dir=cache_dir)
    check_local_path(ref_model, "ref_model_name_or_path", cache_dir=cache_dir)
    check_local_path(dataset, "dataset_name", kind="dataset")
    if dataset and not streaming:
        files = local_data_files(dataset)
        _check_not_empty(files, "dataset_name")
        check_utf8(files, "dataset_name")
    check_output_dir(output_dir)


def local_data_files(name: str) -> list[str]:
    """The data files a local dataset `name` reads: the file (or the glob's files), or a folder's data files; none
    for a `save_to_disk` folder, a `trl-nca generate` output folder or a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json", "generate_config.json")):
            return []
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in DATA_FILE_BUILDERS)
    if path.suffix.lower() in DATA_FILE_BUILDERS:
        return sorted(glob.glob(os.path.expanduser(name)))
    return []


def check_output_dir(path: str | None, key: str = "output_dir") -> None:
    """A one-line `UsageError` when `path` (a folder the run writes) is an existing file, or lies below one."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{key}: {path} is a file, not a folder; give a folder (new or existing) for the outputs.")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{key}: {path} cannot be created: {parent} is a file, not a folder.")
            return


# ---------------------------------------------------------------------------------------------------------------------
# Failures while loading
# ---------------------------------------------------------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def hub_failure(error: BaseException, key: str, value: str, kind: str = "model") -> str | None:
    """The one line for `error` when it is a failed Hub look-up of `value` (given as `key`), else ``None``.

    Recognized anywhere in the exception chain, by class name (no import needed): offline mode
    (``OfflineModeIsEnabled``), no such repository (``RepositoryNotFoundError``, datasets' ``DatasetNotFoundError``),
    a gated one (``GatedRepoError``), a missing revision (``RevisionNotFoundError``), an invalid id
    (``HFValidationError``), and no connection (``LocalEntryNotFoundError``, ``ConnectionError``, httpx's
    ``TransportError``/``TimeoutException``); with ``HF_HUB_OFFLINE=1``, a look-up that found nothing in the cache.
    """
    what = _what(kind)
    hint = _sibling_hint(value)
    errors = list(_chain(error))
    names = {cls.__name__ for e in errors for cls in type(e).__mro__}
    text = " ".join(str(e) for e in errors)
    connection = {"LocalEntryNotFoundError", "ConnectionError", "TransportError", "TimeoutException", "gaierror"}
    if "OfflineModeIsEnabled" in names or (names & connection and hub_offline(kind)):
        return f"{key}: {value} is neither a local {what}{hint} nor a Hub id in the local cache; {OFFLINE_RULE}."
    if "GatedRepoError" in names or "is a gated" in text:
        return (
            f"{key}: {value} is a gated {kind} on the Hub: ask for access on its page "
            f"(https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{value}) and log in (`hf auth login`)."
        )
    if "RevisionNotFoundError" in names:
        cause = next(e for e in errors if "RevisionNotFoundError" in {c.__name__ for c in type(e).__mro__})
        return f"{key}: {value}: {_first_line(cause)}"
    if "RepositoryNotFoundError" in names or "DatasetNotFoundError" in names:
        return (
            f"{key}: {value} is not a local {what}{hint}, and the Hub has no {kind} {value} that you can access "
            "(a private one needs `hf auth login`)."
        )
    if "HFValidationError" in names:
        return f"{key}: {value} is not a local {what}{hint}, nor a Hub id (`name` or `namespace/name`)."
    if names & connection:
        cause = errors[-1]
        return (
            f"{key}: {value} is not found locally{hint}, and the Hub could not be reached ({_first_line(cause)}); "
            f"{OFFLINE_RULE}."
        )
    return None


@contextmanager
def hub_lookup(key: str, value: str, kind: str = "model") -> Iterator[None]:
    """Turn a failed Hub look-up of `value` inside the block into a one-line `UsageError` (see `hub_failure`); any
    other error passes through."""
    try:
        yield
    except Exception as error:
        message = hub_failure(error, key, value, kind)
        if message is None:
            raise
        raise UsageError(message) from None


def load_model_config(name: str, key: str, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained(name, **kwargs)``, what loading the model reads first: a failed Hub look-up is a
    one-line `UsageError` naming `key`, before any weights or data are read."""
    from transformers import AutoConfig

    with hub_lookup(key, name, "model"):
        return AutoConfig.from_pretrained(name, **kwargs)


def first_non_utf8_byte(file: str | os.PathLike, chunk_size: int = 1 << 20) -> tuple[int, int, int] | None:
    """``(offset, byte, line)`` of the first byte of `file` that is not UTF-8 (line numbers from 1), or ``None``.

    Streamed `chunk_size` bytes at a time through an incremental decoder (ASCII chunks skip it), stopping at the
    first error, so a file of any size is read once and never held in memory.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines of the chunks decoded so far
    with open(file, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            pending = decoder.getstate()[0]  # the start of a multi-byte character cut by the previous chunk
            try:
                if pending or not chunk.isascii():
                    decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = error.object
                start = offset - len(pending) + error.start
                return start, data[error.start], lines + data[: error.start].count(b"\n") + 1
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def check_utf8(files: Sequence[str], key: str = "dataset_name") -> None:
    """A one-line `DatasetError` naming the first of the text data `files` (``.json``, ``.jsonl``, ``.csv``) that is
    not UTF-8, with the offset and line of its first bad byte (`first_non_utf8_byte`).

    Needed before datasets reads them: its JSON reader stores bytes that are not UTF-8 without a word, and the error
    comes only when a row is read, anywhere in training. Each version of a file (its path, size and modification time)
    is read once: a file found good is remembered in trl-nca's cache folder (``utf8-checked/``), so later runs (and
    the other processes of a launch) skip it.
    """
    for file in files:
        if Path(file).suffix.lower() not in TEXT_DATA_SUFFIXES:
            continue
        stamp = _utf8_stamp(file)
        if stamp.exists():
            continue
        found = first_non_utf8_byte(file)
        if found is not None:
            offset, byte, line = found
            raise DatasetError(
                f"{key}: {file} is not UTF-8 text: the byte 0x{byte:02x} at offset {offset} (line {line}) cannot be "
                "decoded; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
            )
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
        except OSError:  # a cache that cannot be written: the file is read again next time
            pass


def _utf8_stamp(file: str) -> Path:
    """The cache entry that says this version of `file` was found to be UTF-8."""
    from trl_nca.cli_common import cache_dir

    stat = os.stat(file)
    version = f"{os.path.abspath(file)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return cache_dir() / "utf8-checked" / hashlib.sha256(version.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------------------
# Loading a dataset
# ---------------------------------------------------------------------------------------------------------------------


def load_raw_datasets(source: DatasetSource, key: str = "dataset_name") -> DatasetDict | IterableDatasetDict:
    """Load ``source.dataset_name`` as a dataset dict: a `trl-nca generate` output's ``dataset/`` (or a
    ``save_to_disk`` folder), a data file or glob (the split ``source.dataset_train_split``), a folder of data files,
    or a Hub id (see `NCAScriptArguments.dataset_name`).

    A name that cannot load is one line naming `key` (`check_local_path`, `hub_lookup`); so is an empty data file and a
    local text data file that is not UTF-8 (the offset of its first bad byte: `check_utf8`; not when streaming, which
    reads the rows only while training).
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

    name = source.dataset_name
    if not name:
        raise UsageError(f"`{key}` is required: a Hub id, a local folder or a data file.")
    check_local_path(name, key, kind="dataset")
    local = os.path.expanduser(name)
    path = Path(local)
    if path.is_dir() and (path / "generate_config.json").is_file():  # not a dataset: the folder around one
        dataset = Path(name) / "dataset"
        if dataset.expanduser().is_dir():
            raise DatasetError(f"{key}: {name} is a `trl-nca generate` output folder; train on {dataset}")
        raise DatasetError(
            f"{key}: {name} is a `trl-nca generate` output folder without {dataset} (its run did not finish, "
            "or kept no prompt); re-run its `trl-nca generate` command."
        )
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = load_from_disk(local)
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({source.dataset_train_split: loaded})
        if source.dataset_streaming:
            loaded = IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in loaded.items()})
        return loaded
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in DATA_FILE_BUILDERS and not path.is_dir():
        files = sorted(glob.glob(local))
        if not files:
            raise DatasetError(f"{key}: no data file matches {name}.")
        _check_not_empty(files, key)
        data_files = {source.dataset_train_split: local}
        if not source.dataset_streaming:
            check_utf8(files, key)
        loaded = load_dataset(DATA_FILE_BUILDERS[suffix], data_files=data_files, streaming=source.dataset_streaming)
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in DATA_FILE_BUILDERS)
        _check_not_empty(files, key)
        if not source.dataset_streaming:
            check_utf8(files, key)
        loaded = load_dataset(local, name=source.dataset_config, streaming=source.dataset_streaming)
    else:
        with hub_lookup(key, name, "dataset"):
            loaded = load_dataset(name, name=source.dataset_config, streaming=source.dataset_streaming)
    if isinstance(loaded, (Dataset, IterableDataset)):
        loaded = (IterableDatasetDict if isinstance(loaded, IterableDataset) else DatasetDict)(
            {source.dataset_train_split: loaded}
        )
    return loaded


def _check_not_empty(files: Sequence[str], key: str = "dataset_name") -> None:
    """A `DatasetError` naming the first data file that holds no rows (0 bytes or only whitespace)."""
    for file in files:
        with open(file, "rb") as handle:
            if not handle.read(4096).strip():
                raise DatasetError(f"{key}: the data file {file} is empty (no rows).")


# ---------------------------------------------------------------------------------------------------------------------
# trl-nca generate
# ---------------------------------------------------------------------------------------------------------------------


def check_generate_sources(config: Any) -> None:
    """`check_local_path` for every source of a `trl-nca generate` config (`trl_nca.RewardDataConfig`): the prompts
    (``dataset_name``), the sampling models (``model_name_or_path``), the reward models of ``reward_funcs`` (not the
    ``module:function`` functions), and `check_output_dir` for ``output_dir``. Imports nothing heavy."""
    check_local_path(config.dataset_name, "dataset_name", kind="dataset")
    for name in config.model_name_or_path or []:
        check_local_path(name, "model_name_or_path")
    for spec in config.reward_funcs or []:
        if not isinstance(spec, str) or ":" in spec:  # a function: checked (imported) with its signature later
            continue
        if spec.endswith(".py") and not Path(spec).is_dir():
            raise UsageError(f"reward_funcs: {spec} names a file but no function in it; write `{spec}:FUNCTION`.")
        try:
            check_local_path(spec, "reward_funcs")
        except UsageError as error:  # the spec may have been meant as a function
            functions = "reward functions are given as `module:function` or `path/to/file.py:function`"
            raise UsageError(f"{str(error).removesuffix('.')}; {functions}.") from None
    check_output_dir(config.output_dir)
