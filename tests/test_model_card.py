"""The model card of a training run: metadata and model-index match the run's files, the body states only what
the run recorded, and the card passes the Hub's metadata validation (the test server's)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from deit_distill.model_cards.card import generate_model_card, write_model_card

REPO = "test-user/deit-tiny-cifar10"


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def edit(run: Path, name: str, **changes: object) -> None:
    """Rewrite one top-level or `section.key` entry of a run file."""
    data = read(run, name)
    for key, value in changes.items():
        *sections, leaf = key.split("__")
        target = data
        for section in sections:
            target = target[section]
        target[leaf] = value
    (run / name).write_text(json.dumps(data))


def body(card: ModelCard) -> str:
    return card.text


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def results_table(text: str) -> dict[str, tuple[str, str]]:
    section = text.split("## Results")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (.+?) \| ([\d.]+|n/a) \| ([\d.]+|n/a) \|$", section, flags=re.MULTILINE)
    return {head: (top1, top5) for head, top1, top5 in rows}


def test_metadata_declares_library_task_tags_and_the_hub_ids_the_run_recorded(make_run):
    run = make_run()
    data = generate_model_card(run, repo_id=REPO).data
    info = read(run, "deit_distill_run.json")
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"deit", "distillation", "vision-transformer", "image-classification"} <= set(data.tags)
    assert data.license == info["license"]
    assert data.datasets == [info["card"]["dataset_id"]]
    assert data.base_model == info["card"]["base_model"]
    assert data.teacher_model == info["card"]["teacher_id"]


def test_local_data_teacher_and_starting_point_stay_out_of_the_metadata(make_run, tmp_path):
    run = make_run()
    teacher = tmp_path / "teachers" / "resnet18"
    teacher.mkdir(parents=True)
    edit(
        run,
        "deit_distill_run.json",
        distillation__teacher=str(teacher),
        data__dataset_name="data/clothes",
        card__dataset_id=None,
        card__teacher_id=None,
        card__base_model=None,
    )
    card = generate_model_card(run, repo_id=REPO)
    for key in ("datasets", "base_model", "teacher_model", "eval_results"):
        assert card.data.get(key) is None, key
    assert str(teacher) in body(card)  # the body may say where the teacher was


def test_model_index_holds_each_head_and_the_teacher_exactly_as_measured(make_run):
    run = make_run()
    metrics, data_info = read(run, "eval_results.json"), read(run, "deit_distill_run.json")["data"]
    card = generate_model_card(run, repo_id=REPO)
    reloaded = ModelCard(str(card))  # what the Hub and ModelCard.load parse back
    names = {"cls": "CLS head", "dist": "DIST head", "avg": "CLS+DIST average", "teacher": "Teacher ("}
    for results in (card.data.eval_results, reloaded.data.eval_results):
        assert len(results) == 8
        for result in results:
            head = next(h for h, name in names.items() if result.metric_name.startswith(name))
            k = result.metric_args["top_k"]
            assert result.metric_name.endswith(f"top-{k} accuracy")
            assert result.metric_value == metrics[f"eval_{head}_top{k}"]
            assert result.metric_type == "accuracy" and result.task_type == "image-classification"
            assert result.dataset_type == read(run, "deit_distill_run.json")["card"]["dataset_id"]
            assert result.dataset_config == data_info["dataset_config"]
            assert result.dataset_split == data_info["eval_split"]
    assert reloaded.data.model_name == "deit-tiny-cifar10"


def test_results_table_shows_each_head_in_percent(make_run):
    run = make_run()
    metrics = read(run, "eval_results.json")
    table = results_table(body(generate_model_card(run, repo_id=REPO)))
    expected = {
        "CLS head": "cls",
        "DIST head": "dist",
        "CLS+DIST average": "avg",
        "Teacher (edadaltocg/resnet18_cifar10)": "teacher",
    }
    assert table == {
        row: (f"{100 * metrics[f'eval_{h}_top1']:.2f}", f"{100 * metrics[f'eval_{h}_top5']:.2f}")
        for row, h in expected.items()
    }


def test_heads_that_were_not_measured_are_left_out(make_run):
    metrics = {"eval_cls_top1": 0.7, "eval_cls_top5": 0.95, "eval_loss": 0.9}  # no DIST head, no teacher
    card = generate_model_card(make_run(metrics=metrics), repo_id=REPO)
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("CLS head top-1 accuracy", 0.7),
        ("CLS head top-5 accuracy", 0.95),
    ]
    assert results_table(body(card)) == {"CLS head": ("70.00", "95.00")}
    assert "teacher top-1" not in body(card) and "matches the teacher" not in body(card)


def test_run_without_evaluation_says_so_and_has_no_model_index(make_run):
    card = generate_model_card(make_run(metrics=None), repo_id=REPO)
    assert "No evaluation results were measured" in body(card)
    assert "model-index" not in card.data.to_dict() and not card.data.eval_results
    assert "was not evaluated" in body(card)


def test_run_without_a_hub_dataset_id_keeps_results_in_the_body_only(make_run):
    run = make_run()
    edit(run, "deit_distill_run.json", data={}, card__dataset_id=None)
    card = generate_model_card(run, repo_id=REPO)
    assert "model-index" not in card.data.to_dict()
    assert results_table(body(card))["CLS head"] == ("63.12", "95.71")


def test_every_number_in_the_body_comes_from_the_run_files(make_run):
    run = make_run()
    text = body(generate_model_card(run, repo_id=REPO)).split("## Citation")[0]
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # usage code, checked by running it in test_push
    numbers: set[str] = {"1", "5"}  # the "top-1" / "top-5" labels
    strings: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, str):
            strings.append(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.update({str(value), f"{value:,}", f"{100 * value:.2f}"})

    for name in ("config.json", "deit_distill_run.json", "eval_results.json"):
        collect(read(run, name))
    collect(len(read(run, "config.json")["id2label"]))
    for string in sorted(strings, key=len, reverse=True):  # ids and names may hold digits ("cifar10")
        text = text.replace(string, " ")
    printed = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text)
    assert printed and set(printed) <= numbers


def test_settings_the_run_did_not_record_or_left_unset_are_left_out(make_run):
    run = make_run()
    training = {"learning_rate": 0.001, "warmup_steps": None, "max_steps": -1}  # -1: Trainer's "no limit"
    edit(run, "deit_distill_run.json", training=training, hardware=None)
    section = body(generate_model_card(run, repo_id=REPO)).split("## Training")[1].split("## Results")[0]
    assert "learning rate | 0.001" in section
    assert "warmup" not in section and "max steps" not in section and "hardware" not in section
    assert "None" not in section


@pytest.mark.parametrize(("kind", "shows_tau"), [("soft", True), ("hard", False), ("none", False)])
def test_temperature_and_kl_normalisation_are_shown_for_soft_distillation_only(make_run, kind, shows_tau):
    run = make_run()
    edit(run, "deit_distill_run.json", distillation__distillation_type=kind)
    section = body(generate_model_card(run, repo_id=REPO)).split("## Distillation")[1].split("## Training")[0]
    assert ("tau (temperature) | 1.0" in section) is shows_tau
    assert ("KL normalisation | numel" in section) is shows_tau
    assert ("alpha" in section) is (kind != "none")


def test_model_without_distillation_token_is_described_as_a_vit_with_a_vit_native_copy(make_run):
    run = make_run()
    edit(run, "config.json", use_distillation_token=False, inference_head="cls")
    text = body(generate_model_card(run, repo_id=REPO, native_revision="native"))
    assert "without a distillation token (a plain ViT)" in text
    assert "from transformers import AutoImageProcessor, ViTForImageClassification" in text


def test_usage_snippets_name_the_repo_and_revisions_and_are_valid_python(make_run):
    card = generate_model_card(
        make_run(), repo_id="org/model", revision="v1", native_repo_id="org/model-native"
    )
    pipeline_code, native_code, *rest = python_blocks(body(card))
    assert not rest
    assert (
        'pipeline("image-classification", model="org/model", revision="v1", trust_remote_code=True)'
        in pipeline_code
    )
    assert 'DeiTForImageClassificationWithTeacher.from_pretrained("org/model-native")' in native_code
    assert "trust_remote_code" not in native_code
    for code in (pipeline_code, native_code):
        ast.parse(code)
    without_native = generate_model_card(make_run("plain"), repo_id="org/model")
    assert len(python_blocks(body(without_native))) == 1


def test_write_model_card_adds_only_the_card_and_a_linked_png_plot(make_run):
    run = make_run()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    path = write_model_card(run, repo_id=REPO)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert path == run / "README.md"
    assert set(after) - set(before) == {run / "README.md", run / "training_curves.png"}
    assert all(after[p] == content for p, content in before.items())
    assert after[run / "training_curves.png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert "](training_curves.png)" in path.read_text()
    write_model_card(run, repo_id=REPO)  # same log, same bytes: a re-push uploads nothing new
    assert (run / "training_curves.png").read_bytes() == after[run / "training_curves.png"]


def test_run_without_training_log_gets_no_plot_and_the_card_says_so(make_run):
    run = make_run(log_history=None)
    text = write_model_card(run, repo_id=REPO).read_text()
    assert not (run / "training_curves.png").exists()
    assert "no training log" in text and "training_curves.png" not in text


def test_generated_card_passes_hub_metadata_validation(make_run, hub_client):
    run = make_run()
    card_path = write_model_card(run, repo_id=REPO, native_revision="native")
    result = hub_client(
        """
import json
from huggingface_hub import ModelCard
ModelCard.load(PARAMS["card"]).validate()
print(json.dumps("valid"))
""",
        {"card": str(card_path)},
    )
    assert result == "valid"
