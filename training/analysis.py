"""Looking inside a distilled student, as the paper's section 5 does.

- How alike the CLS and DIST tokens are, layer by layer: the mean over images of the cosine between the two
  tokens' outputs at the embedding (the learned tokens plus their position rows) and after every block. The paper
  measures 0.06 for the learned tokens and 0.93 at the last layer: two tokens that start apart and converge.
- How alike the two heads are: the cosine between their weight vectors (flattened, biases left out).
- What each head predicts: agreement of CLS, DIST and their average with the labels and with the teacher,
  overall and per class, and how the two heads' predictions cross (a confusion matrix between them).

Everything but the token cosines is NumPy on logits, so it can be checked against a hand computation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STUDENT_HEADS = ("cls", "dist", "avg")


def token_cosines(hidden_states: Iterable[torch.Tensor]) -> torch.Tensor:
    """`(positions, batch)` cosines between token 0 (CLS) and token 1 (DIST) of each hidden state."""
    return torch.stack([F.cosine_similarity(h[:, 0].float(), h[:, 1].float(), dim=-1) for h in hidden_states])


def head_weight_cosine(model: nn.Module) -> float | None:
    """Cosine between the CLS head's and the DIST head's weights, flattened; `None` without a DIST head."""
    cls_head, dist_head = model.get_classifier()
    if dist_head is None or not isinstance(dist_head, nn.Linear):
        return None
    return F.cosine_similarity(
        cls_head.weight.flatten().float(), dist_head.weight.flatten().float(), dim=0
    ).item()


def head_agreement(
    cls_logits: np.ndarray,
    dist_logits: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    teacher_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Agreement of every student head with the labels and the teacher, overall and per class, and the
    confusion between the heads (`head_confusion[i][j]`: images the CLS head calls `i` and the DIST head `j`).

    Per-class agreement with the labels is the head's recall of that class; with the teacher, it is over the
    images of that (true) class, so the two can be read side by side.
    """
    labels = np.asarray(labels, dtype=np.int64)
    cls_logits, dist_logits = np.asarray(cls_logits, np.float64), np.asarray(dist_logits, np.float64)
    predictions = {
        "cls": cls_logits.argmax(1),
        "dist": dist_logits.argmax(1),
        "avg": ((cls_logits + dist_logits) / 2).argmax(1),
    }
    references = {"labels": labels}
    if teacher_logits is not None:
        references["teacher"] = np.asarray(teacher_logits).argmax(1)
    result: dict[str, Any] = {"num_images": len(labels)}
    for ref_name, reference in references.items():
        result[f"{ref_name}_agreement"] = {
            head: float(np.mean(pred == reference)) for head, pred in predictions.items()
        }
    if "teacher" in references:
        result["teacher_accuracy"] = float(np.mean(references["teacher"] == labels))
    per_class = {}
    for index, name in enumerate(label_names):
        mask = labels == index
        row: dict[str, Any] = {"count": int(mask.sum())}
        for ref_name, reference in references.items():
            for head, pred in predictions.items():
                row[f"{head}_{ref_name}"] = (
                    float(np.mean(pred[mask] == reference[mask])) if mask.any() else None
                )
        per_class[name] = row
    result["per_class"] = per_class
    num_classes = len(label_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (predictions["cls"], predictions["dist"]), 1)
    result["head_confusion"] = confusion.tolist()
    result["heads_agree"] = float(np.trace(confusion) / max(len(labels), 1))
    return result


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    label_names: list[str],
    teacher_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Token and head cosines and head agreement over `batches` (dicts with `pixel_values` and `labels`).

    `teacher_logits` maps a student batch to teacher logits in the student's class order (the trainer's
    `teacher_logits` does the input adaptation and class reordering). The model needs a distillation token.
    """
    if not getattr(model.config, "use_distillation_token", False):
        raise ValueError("The model has no distillation token, so there is no CLS/DIST pair to compare.")
    model.eval()
    cosine_sum, logits, labels, teacher = None, {"cls": [], "dist": []}, [], []
    for batch in batches:
        pixel_values = batch["pixel_values"]
        outputs = model(pixel_values=pixel_values, output_hidden_states=True)
        cosines = token_cosines(outputs.hidden_states).sum(dim=1)
        cosine_sum = cosines if cosine_sum is None else cosine_sum + cosines
        logits["cls"].append(outputs.cls_logits.float().cpu())
        logits["dist"].append(outputs.distillation_logits.float().cpu())
        labels.append(batch["labels"].cpu())
        if teacher_logits is not None:
            teacher.append(teacher_logits(pixel_values).float().cpu())
    if cosine_sum is None:
        raise ValueError("No images to analyse.")
    labels_array = torch.cat(labels).numpy()
    return {
        "cls_dist_cosine": (cosine_sum / len(labels_array)).tolist(),
        "head_weight_cosine": head_weight_cosine(model),
        **head_agreement(
            torch.cat(logits["cls"]).numpy(),
            torch.cat(logits["dist"]).numpy(),
            labels_array,
            label_names,
            torch.cat(teacher).numpy() if teacher else None,
        ),
    }


def format_analysis(result: Mapping[str, Any]) -> str:
    """The analysis as readable text tables (Markdown)."""
    lines = ["| position | CLS-DIST cosine |", "|---|---|"]
    for index, value in enumerate(result["cls_dist_cosine"]):
        lines.append(f"| {'embeddings' if index == 0 else f'block {index}'} | {value:.3f} |")
    weight = result["head_weight_cosine"]
    lines += ["", f"head weight cosine (CLS vs DIST): {'-' if weight is None else f'{weight:.3f}'}"]
    lines += [
        f"CLS and DIST heads predict the same class on {100 * result['heads_agree']:.1f}% of "
        f"{result['num_images']} images",
        "",
    ]
    refs = [ref for ref in ("labels", "teacher") if f"{ref}_agreement" in result]
    header = ["class", "images"] + [f"{head} vs {ref}" for ref in refs for head in STUDENT_HEADS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [
        (
            "all",
            result["num_images"],
            {f"{h}_{r}": result[f"{r}_agreement"][h] for r in refs for h in STUDENT_HEADS},
        )
    ]
    rows += [(name, row["count"], row) for name, row in result["per_class"].items()]
    for name, count, row in rows:
        cells = [_percent(row[f"{head}_{ref}"]) for ref in refs for head in STUDENT_HEADS]
        lines.append("| " + " | ".join([name, str(count), *cells]) + " |")
    if "teacher_accuracy" in result:
        lines += ["", f"teacher top-1 on these images: {100 * result['teacher_accuracy']:.1f}%"]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def plot_analysis(result: Mapping[str, Any], path: str) -> None:
    """Token cosine by depth (left) and the CLS-vs-DIST prediction confusion (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cosines = result["cls_dist_cosine"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(len(cosines)), cosines, marker="o")
    left.set_xticks(range(len(cosines)), ["emb"] + [str(i) for i in range(1, len(cosines))])
    left.set_xlabel("block")
    left.set_ylabel("cosine(CLS, DIST)")
    left.set_ylim(min(0.0, min(cosines)) - 0.05, 1.05)
    left.set_title("CLS and DIST token outputs")
    left.grid(alpha=0.3)
    confusion = np.asarray(result["head_confusion"])
    right.imshow(confusion, cmap="Blues")
    right.set_xlabel("DIST head prediction")
    right.set_ylabel("CLS head prediction")
    right.set_title(f"heads agree on {100 * result['heads_agree']:.1f}%")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
