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
    "RewardDataConfig": ".config",
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
    from .config import InfoNCAConfig, ListwiseConfig, NCAConfig, RewardDataConfig
    from .reward_data import build_reward_dataset
    from .trainer import InfoNCATrainer, ListwiseTrainer, NCATrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
