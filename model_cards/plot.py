"""The training-curve figure of a model card: losses and eval top-1 accuracy against the optimizer step.

The data is Trainer's `log_history` (`trainer_state.json`): training entries carry `loss` (and the distillation
trainer's `base_loss` / `distillation_loss`), evaluation entries carry `eval_loss` and `eval_*_top1`.
"""

from __future__ import annotations

import io
from typing import Any

# Agg through the object API: headless, and the process-wide pyplot backend is left alone.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOSS_CURVES = {
    "loss": "train loss",
    "base_loss": "train loss (labels)",
    "distillation_loss": "train loss (teacher)",
    "eval_loss": "eval loss",
}
ACCURACY_CURVES = {
    "eval_avg_top1": "CLS+DIST average",
    "eval_cls_top1": "CLS head",
    "eval_dist_top1": "DIST head",
    "eval_teacher_top1": "teacher",
}


def _series(
    log_history: list[dict[str, Any]], keys: dict[str, str], scale: float = 1.0
) -> dict[str, list[tuple[float, float]]]:
    """`label -> [(step, value * scale)]` for each key logged at least once; entries without a step are skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    for key, label in keys.items():
        points = [
            (e["step"], e[key] * scale)
            for e in log_history
            if isinstance(e.get(key), (int, float)) and isinstance(e.get("step"), (int, float))
        ]
        if points:
            series[label] = points
    return series


def has_training_curves(log_history: list[dict[str, Any]]) -> bool:
    return bool(_series(log_history, LOSS_CURVES) or _series(log_history, ACCURACY_CURVES))


def plot_training_curves(log_history: list[dict[str, Any]]) -> bytes | None:
    """PNG bytes of the loss panel and, when evaluations were logged, the top-1 panel; None without data."""
    candidates = [
        (_series(log_history, LOSS_CURVES), "loss"),
        (_series(log_history, ACCURACY_CURVES, 100), "top-1 (%)"),
    ]
    panels = [(series, ylabel) for series, ylabel in candidates if series]
    if not panels:
        return None
    figure = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    for axes, (series, ylabel) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for label, points in series.items():
            steps, values = zip(*points, strict=True)
            # Evaluations are sparse: markers keep a single eval point visible.
            axes.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    buffer = io.BytesIO()
    # No "Software" tag: the same log gives the same bytes, so re-pushing an unchanged run uploads nothing new.
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()
