"""Evaluation metrics: the local `deit_accuracy` evaluate module and the Trainer's `compute_metrics`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
from transformers import EvalPrediction

DEIT_ACCURACY_PATH = Path(__file__).resolve().parent / "metrics" / "deit_accuracy"
# Names `compute_metrics` accepts in a prediction layout, and the metric input each one feeds.
_LAYOUT_INPUTS = {"cls": "cls_logits", "dist": "distillation_logits", "teacher": "teacher_logits"}


def load_deit_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """Load the `deit_accuracy` metric by absolute path, which needs no network (`evaluate.load` kwargs pass on)."""
    return evaluate.load(str(DEIT_ACCURACY_PATH), **kwargs)


def build_compute_metrics(layout: Sequence[str]) -> Callable[[EvalPrediction], dict[str, float]]:
    """A Trainer `compute_metrics` for predictions given as a tuple of logits in `layout` order.

    Args:
        layout: Names of the logits in `EvalPrediction.predictions`, in order, from "cls" (required), "dist"
            and "teacher"; e.g. `("cls", "dist", "teacher")`.
    """
    unknown = set(layout) - set(_LAYOUT_INPUTS)
    if unknown or "cls" not in layout:
        raise ValueError(f"layout must contain 'cls' and only {list(_LAYOUT_INPUTS)}, got {list(layout)}.")
    # The Trainer already gathered every prediction in memory; evaluate's cache files would only add disk I/O
    # and lock contention between processes.
    metric = load_deit_accuracy(keep_in_memory=True)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions
        if isinstance(predictions, np.ndarray):
            predictions = (predictions,)
        if len(predictions) != len(layout):
            raise ValueError(
                f"Expected {len(layout)} logits arrays ({list(layout)}), got {len(predictions)}."
            )
        inputs = {_LAYOUT_INPUTS[name]: logits for name, logits in zip(layout, predictions, strict=True)}
        return metric.compute(references=eval_pred.label_ids, **inputs)

    return compute_metrics
