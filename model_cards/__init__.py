"""Model cards and Hub pushes for saved training runs (what a run directory holds is defined once, in `deit_distill.training.run_record`)."""

from .card import generate_model_card, render_card_files, write_model_card
from .push import PushError, PushResult, push_run

__all__ = [
    "PushError",
    "PushResult",
    "generate_model_card",
    "push_run",
    "render_card_files",
    "write_model_card",
]
