"""DeiT accuracy: top-1/top-5 of the CLS head, the distillation head, their average and the teacher.

A local `evaluate` metric, loaded by path so it works offline:
`evaluate.load("/abs/path/training/metrics/deit_accuracy")`. It depends only on evaluate, datasets and numpy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 and top-k (k = min(5, number of classes)) accuracy of a DeiT student, as fractions in [0, 1].

- `cls_top1`, `cls_top5`: the head on the CLS token.
- `dist_top1`, `dist_top5`: the head on the distillation token (only with `distillation_logits`).
- `avg_top1`, `avg_top5`: the mean of both heads' logits, the paper's "class + distillation" prediction;
  equal to `cls_*` for a model without a distillation token.
- `teacher_top1`, `teacher_top5`, `agreement` (only with `teacher_logits`): the teacher's accuracy and the
  fraction of examples where the student's averaged prediction equals the teacher's.

An example counts for top-k when fewer than k classes score strictly higher than its label, so ties are
resolved in the label's favour.
"""

_KWARGS_DESCRIPTION = """
Args:
    cls_logits (`list` of `list` of `float`): (N, C) logits of the CLS head (or of the single head).
    references (`list` of `int`): N class indices.
    distillation_logits (`list` of `list` of `float`, *optional*): (N, C) logits of the distillation head.
    teacher_logits (`list` of `list` of `float`, *optional*): (N, C) logits of the teacher.
Returns:
    `dict` of `float`: the accuracies described above.
Examples:
    >>> metric = evaluate.load("training/metrics/deit_accuracy")
    >>> metric.compute(cls_logits=[[2.0, 1.0], [0.0, 1.0]], references=[0, 0])
    {'cls_top1': 0.5, 'cls_top5': 1.0, 'avg_top1': 0.5, 'avg_top5': 1.0}
"""

_CITATION = """
@inproceedings{touvron2021training,
  title={Training data-efficient image transformers \\& distillation through attention},
  author={Touvron, Hugo and Cord, Matthieu and Douze, Matthijs and Massa, Francisco and Sablayrolles, Alexandre and J{\\'e}gou, Herv{\\'e}},
  booktitle={International Conference on Machine Learning},
  year={2021}
}
"""

_OPTIONAL_INPUTS = ("distillation_logits", "teacher_logits")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DeitAccuracy(evaluate.Metric):
    def _info(self):
        logits = datasets.Sequence(datasets.Value("float32"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "cls_logits": logits,
                    "distillation_logits": logits,
                    "teacher_logits": logits,
                    "references": datasets.Value("int64"),
                }
            ),
        )

    # An absent optional input is stored as one empty row per example, so every input has one schema.
    def add_batch(self, **inputs):
        """Add a batch of logits and references; the optional logits may be left out."""
        return super().add_batch(**_fill_optional_inputs(inputs))

    def compute(self, **inputs):
        """Compute the accuracies; the optional logits may be left out."""
        if inputs.get("references") is not None:
            inputs = _fill_optional_inputs(inputs)
        return super().compute(**inputs)

    def _compute(self, cls_logits, references, distillation_logits, teacher_logits):
        references = np.asarray(references, dtype=np.int64)
        cls_logits = _as_matrix(cls_logits)
        k = min(5, cls_logits.shape[1])
        results = {"cls_top1": _topk(cls_logits, references, 1), "cls_top5": _topk(cls_logits, references, k)}

        average = cls_logits
        distillation_logits = _as_matrix(distillation_logits)
        if distillation_logits is not None:
            average = (cls_logits + distillation_logits) / 2
            results["dist_top1"] = _topk(distillation_logits, references, 1)
            results["dist_top5"] = _topk(distillation_logits, references, k)
        results["avg_top1"] = _topk(average, references, 1)
        results["avg_top5"] = _topk(average, references, k)

        teacher_logits = _as_matrix(teacher_logits)
        if teacher_logits is not None:
            results["teacher_top1"] = _topk(teacher_logits, references, 1)
            results["teacher_top5"] = _topk(teacher_logits, references, k)
            results["agreement"] = float(np.mean(average.argmax(axis=1) == teacher_logits.argmax(axis=1)))
        return results


def _fill_optional_inputs(inputs):
    n = len(inputs["references"])
    return {**inputs, **{name: [[]] * n for name in _OPTIONAL_INPUTS if inputs.get(name) is None}}


def _as_matrix(rows):
    """(N, C) float array, or None for an absent input (all rows empty)."""
    if all(len(row) == 0 for row in rows):
        return None
    return np.asarray(rows, dtype=np.float64)


def _topk(logits, references, k):
    # Rank of the label = number of classes scoring strictly higher.
    label_scores = logits[np.arange(len(references)), references]
    rank = (logits > label_scores[:, None]).sum(axis=1)
    return float(np.mean(rank < k))
