"""`deit_distill.training.analysis` and `deit-distill analyze` against hand computations, and the paper table's quick run.

The quick table (`bench/paper_table.py --quick`, one seed, one regime, tiny models on 40 images) leaves run
directories with their teachers behind, which the `analyze` command then reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification
from deit_distill.training.analysis import analyze_model, head_agreement, head_weight_cosine
from deit_distill.training.commands.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "image_size": 28,
    "patch_size": 7,
    "hidden_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_labels": 4,
}
NAMES = ["a", "b", "c", "d"]


def tiny_model(seed: int = 0) -> DeiTDistillForImageClassification:
    torch.manual_seed(seed)
    return DeiTDistillForImageClassification(DeiTDistillConfig(**TINY)).eval()


def batches(num: int = 2, size: int = 5) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"pixel_values": torch.randn(size, 3, 28, 28, generator=generator), "labels": torch.arange(size) % 4}
        for _ in range(num)
    ]


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_a_dist_token_position_row_and_head_equal_to_cls_give_cosine_one_at_every_layer():
    model = tiny_model()
    with torch.no_grad():
        embeddings = model.deit.embeddings
        embeddings.distillation_token.copy_(embeddings.cls_token)
        embeddings.position_embeddings[:, 1].copy_(embeddings.position_embeddings[:, 0])
        model.distillation_classifier.load_state_dict(model.cls_classifier.state_dict())
    result = analyze_model(model, batches(), NAMES)
    assert len(result["cls_dist_cosine"]) == TINY["num_hidden_layers"] + 1  # embeddings, then every block
    np.testing.assert_allclose(result["cls_dist_cosine"], 1.0, atol=1e-5)
    assert result["head_weight_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["heads_agree"] == 1.0


def test_token_cosines_match_a_hand_computation_from_the_parameters_and_the_blocks():
    model = tiny_model(seed=3)
    data = batches()
    result = analyze_model(model, data, NAMES)
    # Embedding position: the learned tokens plus their position rows, the same for every image.
    embeddings = model.deit.embeddings
    position = embeddings.position_embeddings[0].detach().numpy()
    cls = embeddings.cls_token[0, 0].detach().numpy() + position[0]
    dist = embeddings.distillation_token[0, 0].detach().numpy() + position[1]
    expected = [float(numpy_cosine(cls, dist))]
    # Every block, run by hand (no output capturing), then the mean over all images.
    with torch.no_grad():
        per_block = [[] for _ in model.deit.layers]
        for batch in data:
            hidden = embeddings(batch["pixel_values"])
            for index, layer in enumerate(model.deit.layers):
                hidden = layer(hidden, None)
                per_block[index].append(numpy_cosine(hidden[:, 0].numpy(), hidden[:, 1].numpy()))
    expected += [float(np.concatenate(values).mean()) for values in per_block]
    np.testing.assert_allclose(result["cls_dist_cosine"], expected, atol=1e-5)
    weights = [head.weight.detach().numpy().ravel() for head in model.get_classifier()]
    assert head_weight_cosine(model) == pytest.approx(float(numpy_cosine(*weights)), abs=1e-6)


def test_head_agreement_counts_match_a_hand_count():
    cls = np.array([[2.0, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2]])  # predicts 0, 1, 1, 2
    dist = np.array([[2.0, 0, 0], [0, 0, 2], [0, 2, 0], [2, 0, 0]])  # predicts 0, 2, 1, 0
    labels = np.array([0, 1, 2, 2])
    teacher = np.array([[1.0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])  # says 0, 2, 2, 0
    result = head_agreement(cls, dist, labels, ["x", "y", "z"], teacher)
    # avg = (cls + dist) / 2 predicts 0, 1 (tie 1/2: first), 1, 0 (tie 0/2: first)
    assert result["labels_agreement"] == {"cls": 0.75, "dist": 0.25, "avg": 0.5}
    assert result["teacher_agreement"] == {"cls": 0.25, "dist": 0.75, "avg": 0.5}
    assert result["teacher_accuracy"] == 0.5
    assert result["per_class"]["z"] == {
        "count": 2,
        "cls_labels": 0.5, "dist_labels": 0.0, "avg_labels": 0.0,
        "cls_teacher": 0.0, "dist_teacher": 0.5, "avg_teacher": 0.5,
    }  # fmt: skip
    assert result["head_confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert result["heads_agree"] == 0.5


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """The quick paper table, both parts: teachers and students of one seed in the light regime, and the
    unlabelled-images runs."""
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "bench" / "paper_table.py")
    paper_table = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = paper_table  # dataclasses look their module up there
    spec.loader.exec_module(paper_table)
    out = tmp_path_factory.mktemp("table")
    argv = ["--quick", "--part", "all", "--regimes", "light", "--output_dir", str(out)]
    paper_table.main([*argv, "--results", str(out / "RESULTS.md")])
    return out


def test_paper_table_quick_writes_every_row_with_a_plot_and_the_per_seed_numbers(table):
    document = (table / "RESULTS.md").read_text()
    for row in ("1. no distillation", "2. usual soft", "3. hard distillation", "4. DIST token, DIST head",
                "5. DIST token, CLS+DIST average", "transformer teacher", "a convnet teacher beats"):  # fmt: skip
        assert row in document
    assert (table / "paper_table.png").stat().st_size > 0
    runs = json.loads((table / "paper_table.json").read_text())
    assert set(runs["students"]["light/hard_token/0"]) >= {"cls", "dist", "avg", "curve", "cls_dist_cosine"}
    assert "dist" not in runs["students"]["light/hard_plain/0"]  # a plain ViT has one head
    assert runs["caches"]["light/0"]["cpu_s"] > 0  # the convnet teacher was cached, then replayed
    assert (
        set(runs["teacher_views"])
        == set(runs["teacher_agreement"])
        == {"convnet/light/0", "transformer/light/0"}
    )


def test_each_verdict_in_the_table_follows_from_the_per_seed_numbers(table):
    # Recomputed here from paper_table.json: the per-seed differences in points, their mean, the seeds won, and
    # "within noise" when the mean is no larger than the spread (one seed: no spread, so held or not).
    paper_table = sys.modules["paper_table"]
    runs = json.loads((table / "paper_table.json").read_text())
    document = (table / "RESULTS.md").read_text()
    section = document.split("## Augmentation `light`")[1].split("\n## ")[0]
    shown = dict(
        re.findall(r"^\| (.+?) \| ((?:held|did not hold|within noise) \(.*?\)) \|$", section, re.MULTILINE)
    )
    assert len(shown) == len(paper_table.CLAIMS)
    seeds = runs["config"]["seeds"]
    for claim, (run, head), (other, other_head) in paper_table.CLAIMS:
        better = [runs["students"][f"light/{run}/{seed}"][head] for seed in seeds]
        worse = [runs["students"][f"light/{other}/{seed}"][other_head] for seed in seeds]
        diffs = [100 * b - 100 * w for b, w in zip(better, worse, strict=True)]
        mean = sum(diffs) / len(diffs)
        spread = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
        call = (
            "within noise"
            if len(diffs) > 1 and abs(mean) <= spread
            else "held"
            if mean > 0
            else "did not hold"
        )
        wins = sum(d > 0 for d in diffs)
        assert shown[claim] == f"{call} ({mean:+.1f} points, {wins}/{len(diffs)} seeds)", claim


def test_the_document_names_the_machine_that_ran_it(table):
    import os
    import platform

    import torch

    document = (table / "RESULTS.md").read_text()
    assert "shared 2-core" not in document
    machine = json.loads((table / "paper_table.json").read_text())["machine"]
    assert f"wall clock on {machine})" in document.splitlines()[2]
    for fact in (platform.system(), f"{os.cpu_count()} CPU cores", f"torch {torch.__version__}"):
        assert fact in machine


def test_verdict_against_hand_computed_cases():
    verdict = sys.modules["paper_table"].verdict if "paper_table" in sys.modules else None
    if verdict is None:
        spec = importlib.util.spec_from_file_location(
            "paper_table_verdict", ROOT / "bench" / "paper_table.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["paper_table_verdict"] = module
        spec.loader.exec_module(module)
        verdict = module.verdict
    # +20 and -5 points: mean +7.5, sample spread 17.7 -> within noise, 1 of 2 seeds.
    assert verdict([0.80, 0.70], [0.60, 0.75]) == "within noise (+7.5 points, 1/2 seeds)"
    # +2, +3, +4: mean +3.0, spread 1.0 -> held, 3 of 3.
    assert verdict([0.52, 0.53, 0.54], [0.50, 0.50, 0.50]) == "held (+3.0 points, 3/3 seeds)"
    assert verdict([0.40], [0.45]) == "did not hold (-5.0 points, 0/1 seeds)"


def test_paper_table_unlabeled_part_trains_on_the_unpicked_rows_for_equal_steps(table):
    document = (table / "RESULTS.md").read_text()
    assert "## Beyond the paper: unlabelled images" in document
    assert "the student with unlabelled images beats its teacher" in document
    seed = json.loads((table / "unlabeled" / "seed0.json").read_text())
    students = seed["students"]
    assert students["unlabeled_distilled"]["num_unlabeled"] == 40  # QUICK_UNLABELED's 40 of the unpicked rows
    assert students["labelled"]["num_unlabeled"] == 0
    steps = {key: run["steps"] for key, run in students.items()}
    assert steps["labelled"] == steps["labelled_distilled"] == steps["unlabeled_distilled"] == 5  # 80 / 16
    assert (
        steps["unlabeled_distilled_long"] == steps["labelled_distilled_long"] == steps["labelled_long"] == 10
    )
    assert 0 <= students["unlabeled_distilled"]["teacher_agreement"] <= 1
    assert json.loads((table / "unlabeled.json").read_text())["seeds"][0]["seed"] == 0
    assert "the longer-trained student with unlabelled images beats its teacher" in document
    assert "distilled on the labelled images alone, same longer budget" in document
    assert "distillation beats no teacher on the labelled images alone, longer budget" in document


def test_paper_table_unlabeled_part_keeps_saved_runs_with_the_same_arguments(table, monkeypatch):
    paper_table = sys.modules["paper_table"]
    config = paper_table.UnlabeledConfig(**paper_table.QUICK_UNLABELED, output_dir=str(table))
    saved = json.loads((table / "unlabeled" / "seed0.json").read_text())
    trained = []
    monkeypatch.setattr(paper_table, "timed", lambda function, argv: trained.append(argv) or 0.0)
    assert paper_table.run_unlabeled_seed(config, 0, saved)["students"] == saved["students"]
    assert trained == []  # nothing trained again
    del saved["students"]["unlabeled_distilled_long"]
    paper_table.run_unlabeled_seed(
        config, 0, saved
    )  # the stub trains nothing; the run's files are still there
    assert [argv[argv.index("--output_dir") + 1] for argv in trained] == [
        str(table / "unlabeled" / "seed0" / "unlabeled_distilled_long")
    ]


def test_analyze_a_run_uses_its_own_split_and_teacher_and_prints_json(table):
    run = table / "seed0" / "light" / "hard_token"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(["analyze", str(run), "--json"]) == 0
    result = json.loads(printed.getvalue())
    assert len(result["cls_dist_cosine"]) == 2  # embeddings and the one block of the quick student
    assert result["num_images"] == 40  # the run's own evaluation split
    assert set(result["teacher_agreement"]) == {"cls", "dist", "avg"}  # the run's own teacher
    assert not (run / "analysis.png").exists()  # --json draws no plot unless asked


def test_analyze_prints_a_table_and_draws_a_plot_without_a_teacher(table, tmp_path):
    run = table / "seed0" / "light" / "hard_token"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            cli(
                [
                    "analyze",
                    str(run),
                    "--teacher",
                    "none",
                    "--max_eval_samples",
                    "20",
                    "--plot",
                    str(tmp_path / "a.png"),
                ]
            )
            == 0
        )
    text = printed.getvalue()
    assert "| block 1 |" in text and "cls vs labels" in text and "teacher" not in text.split("plot:")[0]
    assert (tmp_path / "a.png").stat().st_size > 0


def test_analyze_refuses_a_model_without_a_distillation_token(table, capsys):
    assert cli(["analyze", str(table / "seed0" / "light" / "none")]) == 2
    assert "no distillation token" in capsys.readouterr().err


def test_analyze_names_a_missing_model_and_a_model_without_data(tmp_path, capsys):
    assert cli(["analyze", str(tmp_path / "nope")]) == 2
    assert "no such run, model folder or file" in capsys.readouterr().err
    model = tiny_model()
    model.save_pretrained(tmp_path / "bare")  # no run record, so its data is unknown
    assert cli(["analyze", str(tmp_path / "bare")]) == 2
    assert "--dataset_name" in capsys.readouterr().err
