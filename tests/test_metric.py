"""The local `deit_accuracy` metric against accuracies computed here with numpy argmax/argsort."""

import socket

import numpy as np
import pytest
from transformers import EvalPrediction

from deit_distill.training.evaluation import DEIT_ACCURACY_PATH, build_compute_metrics, load_deit_accuracy

N, C = 300, 10


@pytest.fixture(scope="module")
def metric():
    return load_deit_accuracy(keep_in_memory=True)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    references = rng.integers(0, C, N)

    # Logits loosely correlated with the labels, so accuracies are far from both 0 and 1.
    def head(scale):
        return (rng.normal(size=(N, C)) + scale * np.eye(C)[references]).astype(np.float32)

    return {"cls": head(1.0), "dist": head(1.5), "teacher": head(2.0), "references": references}


def top1(z, y):
    return float(np.mean(np.argmax(z, axis=1) == y))


def topk(z, y, k):
    best = np.argsort(-z, axis=1)[:, :k]
    return float(np.mean([label in row for label, row in zip(y, best, strict=True)]))


def test_loads_by_path_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = load_deit_accuracy(keep_in_memory=True)
    assert metric.compute(cls_logits=[[2.0, 1.0], [0.0, 1.0]], references=[0, 0])["cls_top1"] == 0.5
    assert (DEIT_ACCURACY_PATH / "deit_accuracy.py").is_file()


def test_two_heads_and_teacher_match_numpy(metric, logits):
    y = logits["references"]
    result = metric.compute(
        cls_logits=logits["cls"],
        distillation_logits=logits["dist"],
        teacher_logits=logits["teacher"],
        references=y,
    )
    average = (logits["cls"] + logits["dist"]) / 2
    expected = {
        "cls_top1": top1(logits["cls"], y),
        "cls_top5": topk(logits["cls"], y, 5),
        "dist_top1": top1(logits["dist"], y),
        "dist_top5": topk(logits["dist"], y, 5),
        "avg_top1": top1(average, y),
        "avg_top5": topk(average, y, 5),
        "teacher_top1": top1(logits["teacher"], y),
        "teacher_top5": topk(logits["teacher"], y, 5),
        "agreement": float(np.mean(np.argmax(average, axis=1) == np.argmax(logits["teacher"], axis=1))),
    }
    assert result == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected["cls_top1"] < expected["teacher_top1"] < 0.9


def test_single_head_reports_cls_and_equal_avg_only(metric, logits):
    y = logits["references"]
    result = metric.compute(cls_logits=logits["cls"], references=y)
    assert set(result) == {"cls_top1", "cls_top5", "avg_top1", "avg_top5"}
    assert result["cls_top1"] == result["avg_top1"] == pytest.approx(top1(logits["cls"], y))
    assert result["cls_top5"] == result["avg_top5"] == pytest.approx(topk(logits["cls"], y, 5))


def test_top5_becomes_top_c_with_fewer_than_five_classes(metric):
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    result = metric.compute(cls_logits=z, references=y)
    assert result["cls_top5"] == 1.0
    assert result["cls_top1"] == pytest.approx(top1(z, y))


def test_batches_accumulate_to_the_same_result(metric, logits):
    expected = metric.compute(
        cls_logits=logits["cls"], teacher_logits=logits["teacher"], references=logits["references"]
    )
    accumulating = load_deit_accuracy(keep_in_memory=True)
    for start in range(0, N, 128):
        part = slice(start, start + 128)
        accumulating.add_batch(
            cls_logits=logits["cls"][part],
            teacher_logits=logits["teacher"][part],
            references=logits["references"][part],
        )
    assert accumulating.compute() == expected


@pytest.mark.parametrize(
    "layout", [("cls",), ("cls", "dist"), ("cls", "teacher"), ("cls", "dist", "teacher")]
)
def test_compute_metrics_maps_the_trainer_layout(metric, logits, layout):
    predictions = tuple(logits[name] for name in layout)
    result = build_compute_metrics(layout)(
        EvalPrediction(predictions=predictions, label_ids=logits["references"])
    )
    inputs = {"cls": "cls_logits", "dist": "distillation_logits", "teacher": "teacher_logits"}
    expected = metric.compute(
        references=logits["references"], **{inputs[name]: logits[name] for name in layout}
    )
    assert result == expected
    assert ("dist_top1" in result) == ("dist" in layout) and ("agreement" in result) == ("teacher" in layout)


def test_compute_metrics_rejects_a_layout_it_does_not_know():
    with pytest.raises(ValueError, match="layout must contain 'cls'"):
        build_compute_metrics(("dist",))
    with pytest.raises(ValueError, match="Expected 2 logits arrays"):
        build_compute_metrics(("cls", "dist"))(
            EvalPrediction(predictions=(np.zeros((2, 3)),), label_ids=np.zeros(2))
        )
