"""The README's demo runs end to end (at a tiny size), and the eval/predict commands reproduce what it saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deit_distill.training.commands.cli import main as cli
from deit_distill.training.commands.demo import main as demo
from deit_distill.training.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)

EVAL_SAMPLES = 100


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, list[dict]]:
    output = tmp_path_factory.mktemp("demo")
    rows = demo(
        [
            *("--output_dir", str(output), "--train_samples", "200", "--eval_samples", str(EVAL_SAMPLES)),
            *("--teacher_epochs", "1", "--student_epochs", "1", "--num_predict_images", "2"),
        ]
    )
    return output, rows


def test_demo_trains_teacher_and_both_students_then_reports_and_runs_the_pipeline(tiny_demo):
    output, rows = tiny_demo

    assert [row["name"] for row in rows] == ["teacher", "student_distilled", "student_baseline"]
    distilled = {row["name"]: row for row in rows}["student_distilled"]
    on_disk = json.loads((output / "student_distilled" / "eval_results.json").read_text())
    # The table reports exactly what the run measured, including the teacher's own accuracy.
    assert {k: distilled[k] for k in on_disk} == on_disk
    assert distilled["eval_teacher_top1"] == rows[0]["eval_avg_top1"]

    results = (output / "RESULTS.md").read_text()
    assert f"{100 * distilled['eval_avg_top1']:.1f}" in results
    predictions = [line for line in results.splitlines() if line.startswith("test_")]
    assert len(predictions) == 2 and all("predicted=" in line for line in predictions)
    # The distilled model is saved with its processor, code and card, and the baseline has no teacher.
    saved = {p.name for p in (output / "student_distilled").iterdir()}
    assert {"model.safetensors", "preprocessor_config.json", "modeling_deit_distill.py", "README.md"} <= saved
    baseline_run = json.loads((output / "student_baseline" / "deit_distill_run.json").read_text())
    assert baseline_run["distillation"]["teacher"] is None


def test_eval_command_reproduces_the_metrics_the_run_saved(tiny_demo, capsys):
    output, _ = tiny_demo
    distilled, teacher = output / "student_distilled", output / "teacher"
    capsys.readouterr()

    # Same split and subset (seed 0), the saved processor: the numbers the run reported.
    cli(["eval", str(distilled), "--teacher", str(teacher), "--max_eval_samples", str(EVAL_SAMPLES)])
    reported = json.loads(capsys.readouterr().out)
    saved = json.loads((distilled / "eval_results.json").read_text())
    for key in ("eval_cls_top1", "eval_dist_top1", "eval_avg_top1", "eval_teacher_top1", "eval_agreement"):
        assert reported[key] == pytest.approx(saved[key]), key


def test_predict_command_prints_top_k_labels_for_each_image(tiny_demo, capsys):
    output, _ = tiny_demo
    images = sorted((output / "sample_images").glob("*.png"))
    capsys.readouterr()

    cli(["predict", str(output / "student_distilled"), *map(str, images), "--top_k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()[-len(images) :]
    names = json.loads((output / "student_distilled" / "config.json").read_text())["id2label"].values()
    for image, line in zip(images, lines, strict=True):
        assert line.startswith(f"{image}: ") and line.count("(") == 2
        assert sum(name in line for name in names) >= 1
