"""The model card of a training run, from real tiny runs (`trained_runs` in conftest: a convnet teacher, a student
distilled from it, a student trained from a teacher cache with Hub ids given for the card): read back the way the
Hub reads it (`ModelCard.load`), its model-index holds this model's results exactly as the run measured them, its
metadata holds no path of the training machine, and the body states each setting once under its true meaning."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import CARD_BASE_MODEL, CARD_TEACHER_ID
from huggingface_hub import ModelCard

from deit_distill.model_cards.card import (
    DATA_HANDLING_LABELS,
    DISTILLATION_LABELS,
    HYPERPARAMETER_LABELS,
    TRAINING_LABELS,
    generate_model_card,
    write_model_card,
)
from deit_distill.training.run_record import RunRecord
from deit_distill.training.teacher_cache import write_dataset_card

REPO = "test-user/deit-tiny-fashion"
DEIT_HEADS = {"cls": "CLS head", "dist": "DIST head", "avg": "CLS+DIST average"}


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def edit(run: Path, name: str, **changes: object) -> None:
    """Rewrite one top-level or `section__key` entry of a run file."""
    data = read(run, name)
    for key, value in changes.items():
        *sections, leaf = key.split("__")
        target = data
        for section in sections:
            target = target[section]
        target[leaf] = value
    (run / name).write_text(json.dumps(data))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def table(text: str, section: str) -> dict[str, str]:
    """The two-column rows of a body section, label -> value."""
    part = text.split(f"## {section}\n")[1].split("\n## ")[0]
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", part, flags=re.MULTILINE))


def results_table(text: str) -> dict[str, tuple[str, str]]:
    section = text.split("## Results")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (.+?) \| ([\d.]+|n/a) \| ([\d.]+|n/a) \|$", section, flags=re.MULTILINE)
    return {head: (top1, top5) for head, top1, top5 in rows}


def loaded(run: Path, tmp_path: Path, **kwargs) -> ModelCard:
    """The card as the Hub reads it: written to a file and parsed back with `ModelCard.load`."""
    path = tmp_path / f"{run.name}-README.md"
    path.write_text(str(generate_model_card(run, repo_id=REPO, **kwargs)))
    return ModelCard.load(path)


def local_paths(run: Path) -> set[str]:
    """Every path of the training machine the run recorded, and the run's own."""
    record = RunRecord.read(run)
    paths = {str(run), str(run.resolve()), str(run.parent)}
    for value in [*record.distillation.values(), *record.model.values(), *record.data.values()]:
        if isinstance(value, str) and value.startswith("/"):
            paths.add(value)
    return paths


# ------------------------------------------------------------------------------------------------------------------
# Metadata: this model's results only, Hub ids only.


@pytest.mark.parametrize(("source", "native"), [("student", None), ("cached", None), ("cached", "native")])
def test_model_index_read_back_holds_this_models_heads_exactly_as_measured(
    make_run, tmp_path, source, native
):
    run = make_run(source, source=source)
    metrics, record = read(run, "eval_results.json"), RunRecord.read(run)
    card = loaded(run, tmp_path, native_revision=native)
    expected = {
        (f"{name} top-{k} accuracy", metrics[f"eval_{head}_top{k}"])
        for head, name in DEIT_HEADS.items()
        for k in (1, 5)
    }
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == expected
    for result in card.data.eval_results:
        assert result.metric_type == "accuracy" and result.task_type == "image-classification"
        assert result.metric_args == {"top_k": int(result.metric_name[-10])}
        assert result.dataset_type == record.card["dataset_id"] == "zalando-datasets/fashion_mnist"
        assert result.dataset_split == record.data["eval_split_used"] == "test"
    assert card.data.model_name == "deit-tiny-fashion"


def test_the_teachers_accuracy_is_in_the_body_labelled_as_the_teachers_and_not_in_the_index(
    make_run, tmp_path
):
    run = make_run("student")
    metrics = read(run, "eval_results.json")
    card = loaded(run, tmp_path)
    assert not any("teacher" in r.metric_name.lower() for r in card.data.eval_results)
    top1, top5 = (f"{100 * metrics[f'eval_teacher_top{k}']:.2f}" for k in (1, 5))
    assert f"the teacher (not this model) scored {top1}% top-1 and {top5}% top-5" in card.text
    assert set(results_table(card.text)) == set(DEIT_HEADS.values())


def test_a_convnet_run_reports_its_one_head(make_run, tmp_path):
    run = make_run("teacher", source="teacher")
    metrics = read(run, "eval_results.json")
    card = loaded(run, tmp_path)
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        (f"Model top-{k} accuracy", metrics[f"eval_cls_top{k}"]) for k in (1, 5)
    }


@pytest.mark.parametrize("source", ["student", "cached", "teacher"])
def test_no_path_of_the_training_machine_in_the_metadata_or_the_body(
    make_run, trained_runs, tmp_path, source
):
    run = make_run(source, source=source)
    card = loaded(run, tmp_path, native_revision="native")
    metadata = yaml.safe_dump(card.data.to_dict())
    paths = local_paths(run) | {str(path) for path in trained_runs.values()}
    assert paths and not [path for path in paths if path in metadata]
    assert not [path for path in paths if path in card.text]


def test_a_local_teacher_is_named_by_its_folder_and_said_to_be_local(make_run, tmp_path):
    card = loaded(make_run("student"), tmp_path)
    assert card.data.get("teacher_model") is None and card.data.get("base_model") is None
    assert table(card.text, "Distillation")["teacher"] == "`teacher` (a local model, not on the Hub)"
    assert "from `teacher` (a local model, not on the Hub)" in card.text
    assert table(card.text, "Model")["started from"] == "scratch (random initialisation)"


def test_hub_ids_given_for_the_card_are_in_the_metadata_and_linked_in_the_body(make_run, tmp_path):
    card = loaded(make_run("cached", source="cached"), tmp_path)
    assert card.data.teacher_model == CARD_TEACHER_ID and card.data.base_model == CARD_BASE_MODEL
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    link = f"[`{CARD_TEACHER_ID}`](https://huggingface.co/{CARD_TEACHER_ID})"
    assert table(card.text, "Distillation")["teacher"] == link
    assert (
        table(card.text, "Model")["base model"]
        == f"[`{CARD_BASE_MODEL}`](https://huggingface.co/{CARD_BASE_MODEL})"
    )
    assert (
        table(card.text, "Distillation")["teacher outputs read from"]
        == "`cache` (a local teacher cache, not on the Hub)"
    )
    assert "evaluated without a teacher" in card.text


def test_the_teacher_caches_dataset_card_names_no_local_path(trained_runs):
    text = write_dataset_card(trained_runs["cache"]).read_text()
    metadata = text.split("---")[1]
    assert "teacher-cache" in yaml.safe_load(metadata)["tags"]
    assert not [str(path) for path in trained_runs.values() if str(path) in text]
    assert "`teacher` (a local model, not on the Hub)" in text


# ------------------------------------------------------------------------------------------------------------------
# The body: each setting once, under its true meaning.


def test_every_label_the_card_gives_a_record_field_is_a_field_training_writes(trained_runs):
    for source in ("student", "cached"):
        record = RunRecord.read(trained_runs[source])
        assert set(TRAINING_LABELS) <= set(record.training), source
        assert set(HYPERPARAMETER_LABELS) | set(DATA_HANDLING_LABELS) <= set(record.data), source
        assert set(DISTILLATION_LABELS) - {"teacher_cache"} <= set(record.distillation), source
    assert "teacher_cache" in RunRecord.read(trained_runs["cached"]).distillation
    # The fields the card reads by name, beyond its label tables.
    record = RunRecord.read(trained_runs["student"])
    assert {"dataset_name", "dataset_config", "eval_split", "eval_split_used", "num_eval_examples"} <= set(
        record.data
    )
    assert {"architecture", "started_from", "num_parameters", "start_format"} <= set(record.model)
    assert {"base_model", "dataset_id", "teacher_id"} == set(record.card)
    assert record.hardware and record.license


@pytest.mark.parametrize("source", ["student", "cached", "teacher"])
def test_each_setting_appears_once_under_a_readable_label(make_run, tmp_path, source):
    text = loaded(make_run(source, source=source), tmp_path).text
    labels = [
        label
        for section in ("Model", "Distillation", "Training", "Data handling")
        if f"## {section}\n" in text
        for label in table(text, section)
    ]
    labels = [label for label in labels if label not in ("setting", "hyperparameter", "architecture", "---")]
    assert len(labels) == len(set(labels)), labels
    assert not [label for label in labels if "_" in label]  # no flag or record key shown as it is
    assert sum(label == "seed" for label in labels) == 1


def test_warmup_below_one_is_labelled_a_ratio_and_from_one_up_steps(make_run, tmp_path):
    run = make_run("student")
    assert RunRecord.read(run).training["warmup_steps"] == 0.1  # the run's --warmup_steps 0.1
    rows = table(loaded(run, tmp_path).text, "Training")
    assert rows["warmup ratio (of the optimizer steps)"] == "0.1" and "warmup steps" not in rows
    edit(run, "deit_distill_run.json", training__warmup_steps=5)
    rows = table(loaded(run, tmp_path).text, "Training")
    assert rows["warmup steps"] == "5" and not any("ratio" in label for label in rows)


def test_eval_loss_is_rounded_like_the_rest_of_the_card(make_run, tmp_path):
    run = make_run("student")
    loss = read(run, "eval_results.json")["eval_loss"]
    assert (
        f"Eval loss: {loss:.2f}." in loaded(run, tmp_path).text
        and str(loss) not in loaded(run, tmp_path).text
    )


def test_data_handling_has_its_own_section_with_readable_names(make_run, tmp_path):
    run = make_run("student")
    text = loaded(run, tmp_path).text
    rows = table(text, "Data handling")
    data = RunRecord.read(run).data
    assert rows["every image decoded once before training"] == ("yes" if data["verify_images"] else "no")
    assert data["on_corrupt_image"] == "raise"  # the default
    assert rows["a corrupt image"] == "stops the run with an error naming its file"
    assert rows["training images drawn (stratified, at most)"] == "64"
    assert "share of the train split held out for evaluation" not in rows  # the test split was used
    for flag in ("verify_images", "on_corrupt_image", "eval_fraction"):
        assert flag not in text
    assert not set(rows) & set(table(text, "Training"))
    edit(
        run,
        "deit_distill_run.json",
        data__eval_split_used="train (held out 10%)",
        data__on_corrupt_image="skip",
    )
    rows = table(loaded(run, tmp_path).text, "Data handling")
    assert rows["share of the train split held out for evaluation"] == "0.1"
    assert rows["a corrupt image"] == "is skipped and counted"


def test_every_number_in_the_body_comes_from_the_run_files(make_run):
    run = make_run("student")
    text = generate_model_card(run, repo_id=REPO).text.split("## Citation")[0]
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # usage code, checked by running it in test_push
    text = re.sub(r"\(https://huggingface\.co/[^)]*\)", "", text)  # link targets repeat the ids
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
            numbers.update({str(value), f"{value:,}", f"{100 * value:.2f}", f"{value:.2f}"})

    for name in ("config.json", "deit_distill_run.json", "eval_results.json"):
        collect(read(run, name))
    collect(len(read(run, "config.json")["id2label"]))
    for string in sorted(strings, key=len, reverse=True):  # ids and names may hold digits ("mnist")
        text = text.replace(string, " ")
    printed = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text)
    assert printed and set(printed) <= numbers


# ------------------------------------------------------------------------------------------------------------------
# What a run did not record or measure.


def test_heads_that_were_not_measured_are_left_out(make_run):
    metrics = {"eval_cls_top1": 0.7, "eval_cls_top5": 0.95, "eval_loss": 0.9}  # no DIST head, no teacher
    card = generate_model_card(make_run(metrics=metrics), repo_id=REPO)
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("CLS head top-1 accuracy", 0.7),
        ("CLS head top-5 accuracy", 0.95),
    ]
    assert results_table(card.text) == {"CLS head": ("70.00", "95.00")}
    assert "teacher (not this model)" not in card.text and "matches the teacher" not in card.text


def test_run_without_evaluation_says_so_and_has_no_model_index(make_run):
    card = generate_model_card(make_run(metrics=None), repo_id=REPO)
    assert "No evaluation results were measured" in card.text
    assert "model-index" not in card.data.to_dict() and not card.data.eval_results
    assert "was not evaluated" in card.text


def test_run_on_a_local_dataset_keeps_results_in_the_body_only(make_run):
    run = make_run()
    edit(run, "deit_distill_run.json", data__dataset_name="/data/clothes", card__dataset_id=None)
    card = generate_model_card(run, repo_id=REPO)
    assert "model-index" not in card.data.to_dict() and card.data.datasets is None
    assert "`clothes` (a local dataset, not on the Hub)" in card.text and "/data/clothes" not in card.text
    metrics = read(run, "eval_results.json")
    assert results_table(card.text)["CLS head"] == tuple(
        f"{100 * metrics[f'eval_cls_top{k}']:.2f}" for k in (1, 5)
    )


def test_settings_the_run_did_not_record_or_left_unset_are_left_out(make_run):
    run = make_run()
    edit(run, "deit_distill_run.json", training={"learning_rate": 0.001, "warmup_steps": None}, hardware=None)
    section = generate_model_card(run, repo_id=REPO).text.split("## Training")[1].split("## Data handling")[0]
    assert "learning rate | 0.001" in section
    assert "warmup" not in section and "hardware" not in section and "None" not in section


@pytest.mark.parametrize(("kind", "shows_tau"), [("soft", True), ("hard", False), ("none", False)])
def test_temperature_and_kl_normalisation_are_shown_for_soft_distillation_only(make_run, kind, shows_tau):
    run = make_run()
    edit(run, "deit_distill_run.json", distillation__distillation_type=kind, distillation__tau=2.0)
    edit(run, "deit_distill_run.json", distillation__kl_reduction="numel")
    section = generate_model_card(run, repo_id=REPO).text.split("## Distillation")[1].split("## Training")[0]
    assert ("tau (temperature) | 2.0" in section) is shows_tau
    assert ("KL normalisation | numel" in section) is shows_tau
    assert ("alpha" in section) is (kind != "none")


def test_model_without_distillation_token_is_described_as_a_vit_with_a_vit_native_copy(make_run):
    run = make_run()
    edit(run, "config.json", use_distillation_token=False, inference_head="cls")
    text = generate_model_card(run, repo_id=REPO, native_revision="native").text
    assert "without a distillation token (a plain ViT)" in text
    assert "from transformers import AutoImageProcessor, ViTForImageClassification" in text


def test_usage_snippets_name_the_repo_and_revisions_and_are_valid_python(make_run):
    card = generate_model_card(
        make_run(), repo_id="org/model", revision="v1", native_repo_id="org/model-native"
    )
    pipeline_code, native_code, *rest = python_blocks(card.text)
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
    assert len(python_blocks(without_native.text)) == 1


def test_write_model_card_adds_only_the_card_and_a_linked_png_plot(make_run):
    run = make_run()
    for name in ("README.md", "training_curves.png"):  # training wrote them: start without
        (run / name).unlink()
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
    (run / "training_curves.png").unlink()
    text = write_model_card(run, repo_id=REPO).read_text()
    assert not (run / "training_curves.png").exists()
    assert "no training log" in text and "training_curves.png" not in text


def test_generated_card_passes_hub_metadata_validation(make_run, hub_client):
    card_path = write_model_card(make_run(), repo_id=REPO, native_revision="native")
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
