"""`deit-distill eval RUN` evaluates a run as its training did: a run trained from a teacher cache without a live
teacher, and in the run's own precision. The reference is the run's own `eval_results.json`."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RUN, TINY_STUDENT

from deit_distill.training.commands.cli import main as cli
from deit_distill.training.commands.train import main as train

MEASURED = (
    "eval_loss",
    "eval_cls_top1",
    "eval_cls_top5",
    "eval_dist_top1",
    "eval_dist_top5",
    "eval_avg_top1",
)


def evaluate(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert cli(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_cache_trained_run_is_evaluated_without_a_live_teacher_as_training_did(trained_runs, capsys):
    run = trained_runs["cached"]
    recorded = json.loads((run / "eval_results.json").read_text())
    assert not any(key.startswith("eval_teacher") for key in recorded)  # training ran no teacher
    metrics = evaluate(capsys, run)
    assert not any(key.startswith("eval_teacher") for key in metrics) and "eval_agreement" not in metrics
    assert {key: metrics[key] for key in MEASURED} == pytest.approx({key: recorded[key] for key in MEASURED})
    # Asked for, the teacher runs live.
    with_teacher = evaluate(capsys, run, "--teacher", trained_runs["teacher"])
    assert "eval_teacher_top1" in with_teacher


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bf16") / "run"
    train(
        [
            *TINY_STUDENT,
            *TINY_RUN,
            "--distillation_type",
            "none",
            "--bf16",
            "true",
            "--output_dir",
            str(output_dir),
        ]
    )
    return output_dir


def test_a_bf16_run_is_evaluated_in_bf16(bf16_run, capsys):
    record = json.loads((bf16_run / "deit_distill_run.json").read_text())
    assert record["training"]["mixed_precision"] == "bf16"
    recorded = json.loads((bf16_run / "eval_results.json").read_text())
    own = evaluate(capsys, bf16_run)
    fp32 = evaluate(capsys, bf16_run, "--precision", "fp32")
    assert own["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-6)
    assert fp32["eval_loss"] != pytest.approx(
        recorded["eval_loss"], rel=1e-6
    )  # the precision shows in the loss
