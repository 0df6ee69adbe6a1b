"""The transfer-learning workflow end to end, on a local imagefolder and locally saved "pretrained" checkpoints:

imagefolder without an eval split -> fine-tune a 1000-class transformers ConvNeXt and a timm ResNet (Hugging Face
layout) as teachers -> distil students that start from a transformers DeiTForImageClassificationWithTeacher and
from a timm DeiT folder -> `eval RUN_DIR` equals `eval_results.json` -> `predict` on a folder with a bad file ->
push to the local Hub -> the pipeline in a clean process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from hub_server import DEFAULT_TOKEN
from PIL import Image
from timm.models import save_for_hf
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTImageProcessor,
)

from deit_distill.modeling_deit_distill import DeiTDistillForImageClassification, from_transformers_deit
from deit_distill.training.checkpoints import load_starting_point
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.run_record import RunRecord, read_eval_results

CLASSES = ("blue", "green", "red")
STEPS = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-3",
    "--use_cpu", "true",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--save_strategy", "no",
]  # fmt: skip
# Keys of eval_results.json that `eval` must reproduce exactly (timings differ by nature).
MEASURED = re.compile(r"^eval_(loss|\w+_top\d|agreement)$")


def make_imagefolder(root: Path) -> Path:
    """36 images in 3 class folders, no split folders (so no eval split), sizes and modes mixed."""
    rng = np.random.default_rng(0)
    for channel, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 90, (40 + i, 44, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            image = Image.fromarray(pixels)
            image = image.convert("L").convert("RGB") if i == 0 else image
            image.save(root / name / f"{i}.png")
    return root


def save_pretrained_checkpoints(root: Path) -> SimpleNamespace:
    """Random 1000-class checkpoints in the layouts users download: transformers and timm (Hugging Face layout)."""
    torch.manual_seed(0)
    convnext = root / "convnext-1k"
    config = ConvNextConfig(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2, num_labels=1000, image_size=32)
    ConvNextForImageClassification(config).save_pretrained(convnext)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(convnext)

    timm_resnet = root / "timm-resnet"
    resnet = timm.create_model("test_resnet", pretrained=False)
    resnet.pretrained_cfg = {**resnet.pretrained_cfg, "input_size": (3, 32, 32), "mean": (0.5,) * 3}
    save_for_hf(resnet, timm_resnet)

    hf_deit = root / "hf-deit"
    deit_config = DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
        image_size=32, num_labels=1000,
    )  # fmt: skip
    DeiTForImageClassificationWithTeacher(deit_config).save_pretrained(hf_deit)
    DeiTImageProcessor(
        size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(hf_deit)

    timm_deit = root / "timm-deit"
    deit = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2,
    )  # fmt: skip
    deit.pretrained_cfg = {**deit.pretrained_cfg, "input_size": (3, 32, 32)}
    save_for_hf(deit, timm_deit)
    return SimpleNamespace(convnext=convnext, timm_resnet=timm_resnet, hf_deit=hf_deit, timm_deit=timm_deit)


def train(data: Path, output_dir: Path, *flags: str) -> Path:
    assert cli(["train", "--dataset_name", str(data), *STEPS, *flags, "--output_dir", str(output_dir)]) == 0
    return output_dir


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("transfer")
    data = make_imagefolder(root / "clothes")
    pretrained = save_pretrained_checkpoints(root / "pretrained")
    runs = root / "runs"
    teacher = train(
        data,
        runs / "teacher",
        "--model_name_or_path",
        str(pretrained.convnext),
        "--distillation_type",
        "none",
    )
    timm_teacher = train(
        data,
        runs / "timm-teacher",
        "--model_name_or_path",
        str(pretrained.timm_resnet),
        "--distillation_type",
        "none",
    )
    student = train(
        data, runs / "student", "--model_name_or_path", str(pretrained.hf_deit), "--teacher", str(teacher)
    )
    timm_student = train(
        data,
        runs / "timm-student",
        "--model_name_or_path",
        str(pretrained.timm_deit),
        "--teacher",
        str(timm_teacher),
    )
    return SimpleNamespace(
        root=root,
        data=data,
        pretrained=pretrained,
        teacher=teacher,
        timm_teacher=timm_teacher,
        student=student,
        timm_student=timm_student,
    )


def test_pretrained_convnets_are_fine_tuned_as_they_are_with_their_own_preprocessing(workflow):
    for run, architecture in ((workflow.teacher, "ConvNextForImageClassification"),
                              (workflow.timm_teacher, "TimmWrapperForImageClassification")):  # fmt: skip
        model = AutoModelForImageClassification.from_pretrained(run)
        assert type(model).__name__ == architecture
        assert [model.config.id2label[i] for i in range(3)] == list(CLASSES)
        record = RunRecord.read(run)
        assert record.model["start_format"] == "as_is"
        assert record.model["num_parameters"] < 2_000_000  # nothing of the 340M-parameter accident
    # Each keeps its own preprocessing: the ConvNeXt its image processor, the timm model its pretrained_cfg.
    processor = AutoImageProcessor.from_pretrained(workflow.teacher)
    assert type(processor).__name__.startswith("ConvNextImageProcessor") and processor.size == {
        "shortest_edge": 32
    }
    timm_processor = AutoImageProcessor.from_pretrained(workflow.timm_teacher)
    assert timm_processor.data_config["input_size"] == (3, 32, 32)
    assert tuple(timm_processor.data_config["mean"]) == (0.5,) * 3


def test_students_start_from_transformers_and_timm_deit_checkpoints(workflow):
    for run, start_format in ((workflow.student, "transformers"), (workflow.timm_student, "timm")):
        record = RunRecord.read(run)
        assert record.model["start_format"] == start_format
        assert record.distillation["distillation_type"] == "hard"
        model = AutoModelForImageClassification.from_pretrained(run, trust_remote_code=True)
        assert isinstance(model, DeiTDistillForImageClassification)
        assert model.config.num_labels == 3 and model.config.use_distillation_token
        assert "eval_teacher_top1" in read_eval_results(run)


def test_a_converted_student_starts_from_the_checkpoints_weights(workflow):
    # Everything but the new heads is the transformers checkpoint's, converted bit-exactly; 2 steps at lr 1e-3
    # move them a little.
    source = from_transformers_deit(
        DeiTForImageClassificationWithTeacher.from_pretrained(workflow.pretrained.hf_deit)
    )
    trained = DeiTDistillForImageClassification.from_pretrained(workflow.student)
    for name, value in source.state_dict().items():
        if "classifier" not in name:
            torch.testing.assert_close(trained.state_dict()[name], value, atol=0.05, rtol=0, msg=name)


def test_the_run_records_where_its_data_came_from(workflow):
    record = RunRecord.read(workflow.student)
    assert record.data["dataset_name"] == str(workflow.data)
    assert record.data["eval_split_used"] == "train (held out 10%)"
    assert (record.data["num_train_examples"], record.data["num_eval_examples"]) == (32, 4)
    # Local paths never reach the card's metadata.
    assert record.card == {"base_model": None, "dataset_id": None, "teacher_id": None}
    card = (workflow.student / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert str(workflow.root) not in front_matter


@pytest.mark.parametrize("run_name", ["student", "timm_student", "teacher"])
def test_eval_of_a_run_directory_reproduces_its_eval_results(workflow, run_name, capsys):
    run = getattr(workflow, run_name)
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = read_eval_results(run)
    assert set(printed) == set(saved)
    measured = {key for key in saved if MEASURED.match(key)}
    assert measured >= {"eval_loss", "eval_avg_top1"}
    for key in measured:
        assert printed[key] == pytest.approx(saved[key], abs=1e-6), key


def test_eval_flags_override_the_run_and_a_foreign_model_needs_a_dataset(workflow, capsys):
    assert cli(["eval", str(workflow.student), "--max_eval_samples", "3", "--teacher", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "eval_teacher_top1" not in printed and printed["eval_avg_top1"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert cli(["eval", str(workflow.pretrained.hf_deit)]) == 2
    assert "pass --dataset_name" in capsys.readouterr().err


def test_predict_classifies_a_folder_and_reports_a_bad_file_without_stopping(workflow, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    Image.open(workflow.data / "red" / "3.png").save(images / "a.png")
    Image.open(workflow.data / "blue" / "4.png").save(images / "nested" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert cli(["predict", str(workflow.student), str(images), "--top_k", "2", "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["file"]).name for line in lines] == ["a.png", "broken.png", "b.jpg"]
    assert "error" in lines[1]
    for line in (lines[0], lines[2]):
        assert len(line["predictions"]) == 2 and {p["label"] for p in line["predictions"]} <= set(CLASSES)


def test_a_distilled_run_is_pushed_and_runs_in_the_pipeline_where_the_project_is_absent(
    workflow, hub_client, hub_server
):
    # The push runs in a subprocess: huggingface_hub reads HF_ENDPOINT (the test Hub) when it is imported.
    push = """
        import json
        from deit_distill.training.commands.cli import main
        print(json.dumps(main(["push", PARAMS["run"], "--repo_id", "test-user/clothes-deit"])))
    """
    assert hub_client(push, {"run": str(workflow.timm_student)}, token=DEFAULT_TOKEN) == 0
    script = """
        import json
        from transformers import pipeline
        classifier = pipeline("image-classification", model="test-user/clothes-deit", trust_remote_code=True)
        print(json.dumps(classifier(PARAMS["image"], top_k=3)))
    """
    predictions = hub_client(
        script, {"image": str(workflow.data / "green" / "5.png")}, token=DEFAULT_TOKEN, clean=True
    )
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_a_same_sized_head_for_other_classes_is_reordered_or_started_afresh(tmp_path):
    torch.manual_seed(1)
    config = ConvNextConfig(
        depths=[1], hidden_sizes=[8], num_stages=1, num_labels=3, id2label={0: "red", 1: "blue", 2: "green"}
    )
    source = ConvNextForImageClassification(config).eval()
    source.save_pretrained(tmp_path / "rgb")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixels).logits

    # The dataset's classes in another order: the head's rows follow them, so predictions keep their meaning.
    reordered = load_starting_point(str(tmp_path / "rgb"), dict(enumerate(CLASSES))).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reordered(pixels).logits, expected[:, [1, 2, 0]])
    # Other classes of the same count: a new head, not the old classes under new names.
    other = load_starting_point(str(tmp_path / "rgb"), {0: "cat", 1: "dog", 2: "fox"}).model
    assert not torch.equal(other.classifier.weight, source.classifier.weight)
    assert torch.equal(
        other.convnext.embeddings.patch_embeddings.weight, source.convnext.embeddings.patch_embeddings.weight
    )


def test_an_official_timm_state_dict_file_starts_a_student_with_timms_outputs(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=1,
        num_heads=1, num_classes=4,
    ).eval()  # fmt: skip
    torch.save({"model": reference.state_dict()}, tmp_path / "deit.pth")  # the official checkpoints' layout
    labels = {i: f"class{i}" for i in range(4)}
    start = load_starting_point(str(tmp_path / "deit.pth"), labels)
    assert start.kind == "timm" and start.model.config.num_attention_heads == 1  # width 64 / 64 per head
    pixels = torch.randn(2, 3, 32, 32)
    # The backbone is timm's; a state dict names no classes, so the heads are new ones for the dataset's labels.
    with torch.no_grad():
        torch.testing.assert_close(
            start.model.eval().forward_features(pixels),
            reference.forward_features(pixels),
            atol=1e-5,
            rtol=1e-5,
        )
    assert [start.model.config.id2label[i] for i in range(4)] == list(labels.values())


def test_the_card_states_the_epochs_and_steps_actually_trained(workflow):
    # --max_steps 2 on 32 training images in batches of 8 stops half-way through the first epoch.
    training = RunRecord.read(workflow.student).training
    assert (training["epochs"], training["steps"]) == (0.5, 2)
    card = (workflow.student / "README.md").read_text()
    assert "| epochs trained | 0.5 |" in card and "| optimizer steps | 2 |" in card
