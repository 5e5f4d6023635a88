"""trl-nca: NCA and InfoNCA (Chen et al., NeurIPS 2024), and the listwise objectives, as drop-in TRL trainers.

The public classes are imported lazily, so `trl-nca --help` and the light modules do not pay for torch/TRL imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DataCollatorForKWayReward": ".collator",
    "InfoNCAConfig": ".config",
    "NCAConfig": ".config",
    "InfoNCATrainer": ".trainer",
    "ListwiseConfig": ".config",
    "ListwiseTrainer": ".trainer",
    "NCATrainer": ".trainer",
    "RewardDataConfig": ".generate_config",
    "build_reward_dataset": ".reward_data",
}

__all__ = [
    "DataCollatorForKWayReward",
    "InfoNCAConfig",
    "InfoNCATrainer",
    "ListwiseConfig",
    "ListwiseTrainer",
    "NCAConfig",
    "NCATrainer",
    "RewardDataConfig",
    "__version__",
    "build_reward_dataset",
]

if TYPE_CHECKING:
    from .collator import DataCollatorForKWayReward
    from .config import InfoNCAConfig, ListwiseConfig, NCAConfig
    from .generate_config import RewardDataConfig
    from .reward_data import build_reward_dataset
    from .trainer import InfoNCATrainer, ListwiseTrainer, NCATrainer


#: Accelerator packages DeepSpeed probes before CUDA (`deepspeed/accelerator/real_accelerator.py`, `get_accelerator`):
#: where one is installed DeepSpeed may pick it, so its own detection decides.
_DEEPSPEED_PROBED_PACKAGES = ("torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu", "torch_supa", "torch_xmlir")


def default_deepspeed_accelerator() -> None:
    """Set `DS_ACCELERATOR=cpu` when DeepSpeed would fall back to the CPU anyway, so that it does not log "Setting
    accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." on every CPU run.

    DeepSpeed reads the variable the first time it picks its accelerator (on `import deepspeed`, which accelerate does
    when a trainer is built or a DeepSpeed launch starts), so call this before. A value the user set is kept. It is
    set only when torch has no accelerator (a CPU build, or a CUDA build that sees no GPU, counted through NVML
    without initialising CUDA) and none of the other accelerator packages DeepSpeed probes is installed: the cases
    where DeepSpeed's own detection ends on the CPU. Call it where torch is already imported.
    """
    import os

    if "DS_ACCELERATOR" in os.environ:
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return
    if any(importlib.util.find_spec(name) is not None for name in _DEEPSPEED_PROBED_PACKAGES):
        return
    import torch

    accelerator = torch.accelerator.current_accelerator()  # compiled in; no device query, so fork stays safe
    if accelerator is None or (accelerator.type == "cuda" and torch.cuda.device_count() == 0):
        os.environ["DS_ACCELERATOR"] = "cpu"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
