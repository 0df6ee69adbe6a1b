"""Model cards and Hub pushes for saved training runs (see `deit_distill.model_cards.run` for what a run directory holds)."""

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
