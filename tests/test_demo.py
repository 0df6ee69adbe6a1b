"""The README's demo runs end to end (at a tiny size): teacher, distilled and baseline students, table, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import FASHION_MNIST_DIR
from training.demo import main

pytestmark = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


def test_demo_trains_teacher_and_both_students_then_reports_and_runs_the_pipeline(tmp_path):
    output = tmp_path / "demo"
    rows = main(
        [
            "--output_dir",
            str(output),
            "--train_samples",
            "200",
            "--eval_samples",
            "100",
            "--teacher_epochs",
            "1",
            "--student_epochs",
            "1",
            "--num_predict_images",
            "2",
        ]
    )

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
