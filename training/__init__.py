"""Teacher-guided training of DeiT students with the Hugging Face Trainer."""

from .collator import DistillationCollator
from .losses import DistillationLoss, DistillationLossOutput
from .trainer import DistillationTrainer, last_complete_checkpoint

__all__ = [
    "DistillationCollator",
    "DistillationLoss",
    "DistillationLossOutput",
    "DistillationTrainer",
    "last_complete_checkpoint",
]
