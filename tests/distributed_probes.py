"""Trainer callbacks that the multi-process tests inject into `trl_nca.scripts.train` (its `--callbacks` option).

They run inside every launched process and write what the test process cannot see from outside to
``$TRL_NCA_PROBE_DIR``:

- ``rank{r}.json``: the distributed set-up as this rank saw it (world size, accelerate's distributed type, whether
  ZeRO-3 is on) and, per parameter, the numel this rank holds locally vs the full numel;
- ``rank{r}.safetensors``: the full final parameters, gathered from the ZeRO-3 shards when needed, at the end of
  training.

`StopAtStep` ends training early at ``$TRL_NCA_STOP_AT_STEP`` (after that step's checkpoint is written), to stand in
for an interrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

PROBE_DIR_ENV = "TRL_NCA_PROBE_DIR"
STOP_AT_ENV = "TRL_NCA_STOP_AT_STEP"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _is_zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def finish() -> None:
    """Wait for every rank, then leave the process group as `trl-nca`'s commands do at a successful exit
    (`trl_nca.cli_common.end_process_group`, which says why)."""
    from trl_nca.cli_common import end_process_group

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    end_process_group()


class ShardProbe(TrainerCallback):
    """Record the distributed set-up and parameter sharding at train begin, and the final full weights at train end."""

    def __init__(self) -> None:
        self.out = Path(os.environ[PROBE_DIR_ENV])
        self.out.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState

        local, full = {}, {}
        for name, param in model.named_parameters():
            # Under ZeRO-3 a parameter's data is an empty placeholder; `ds_tensor` is this rank's shard.
            local[name] = param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
            full[name] = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        record = {
            "rank": _rank(),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "distributed_type": str(PartialState().distributed_type),
            "num_processes": PartialState().num_processes,
            "zero3": _is_zero3(),
            "local_numel": local,
            "full_numel": full,
            "layout": getattr(getattr(kwargs.get("train_dataloader"), "collate_fn", None), "layout", None),
        }
        (self.out / f"rank{record['rank']}.json").write_text(json.dumps(record))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        gather = contextlib.nullcontext()
        if _is_zero3():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
        with gather:  # collective under ZeRO-3: every rank enters it
            weights = {name: param.detach().clone().contiguous().cpu() for name, param in params.items()}
        save_file(weights, str(self.out / f"rank{_rank()}.safetensors"))


class StopAtStep(TrainerCallback):
    """Stop training after global step ``$TRL_NCA_STOP_AT_STEP``, saving a checkpoint there."""

    def __init__(self) -> None:
        self.stop_at = int(os.environ[STOP_AT_ENV])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            control.should_save = True
            control.should_training_stop = True
        return control


class SlowSteps(TrainerCallback):
    """Sleep ``$TRL_NCA_STEP_SLEEP`` seconds (default 0.3) after every step, so a test can signal a run mid-way."""

    def __init__(self) -> None:
        import time

        self.sleep, self.delay = time.sleep, float(os.environ.get("TRL_NCA_STEP_SLEEP", "0.3"))

    def on_step_end(self, args, state, control, **kwargs):
        self.sleep(self.delay)
