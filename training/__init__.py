"""Teacher-guided training of DeiT students with the Hugging Face Trainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .collator import DistillationCollator
    from .losses import DistillationLoss, DistillationLossOutput
    from .trainer import DistillationTrainer, last_complete_checkpoint

# Loaded on first use, so that `deit-distill` (whose modules live in this package) starts without importing torch,
# transformers and datasets before it can answer --help or a Ctrl-C.
_EXPORTS = {
    "DistillationCollator": ".collator",
    "DistillationLoss": ".losses",
    "DistillationLossOutput": ".losses",
    "DistillationTrainer": ".trainer",
    "last_complete_checkpoint": ".trainer",
}
__all__ = [
    "DistillationCollator",
    "DistillationLoss",
    "DistillationLossOutput",
    "DistillationTrainer",
    "last_complete_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
