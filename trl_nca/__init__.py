"""trl-nca: NCA and InfoNCA (Chen et al., NeurIPS 2024) as drop-in TRL trainers."""

from .collator import DataCollatorForKWayReward
from .config import InfoNCAConfig, NCAConfig
from .trainer import InfoNCATrainer, NCATrainer

__version__ = "0.1.0"

__all__ = ["DataCollatorForKWayReward", "InfoNCAConfig", "InfoNCATrainer", "NCAConfig", "NCATrainer", "__version__"]
