"""The training entry point: recipes and flags, learning-rate scaling, config overrides, the console script, a
teacher trained with the script then used for distillation, the files a run leaves, and its errors.

The end-to-end runs are tiny (128 Fashion-MNIST images, 2 steps) and share one teacher trained through the
`deit-distill` console script in a subprocess.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig

from deit_distill.training.arguments import (
    AugmentationArguments,
    DataArguments,
    DistillationArguments,
    ModelArguments,
    RunArguments,
)
from deit_distill.training.commands.train import main, parse_args, recipe_to_argv, scaled_learning_rate
from deit_distill.training.data import FASHION_MNIST_CLASSES, load_image_dataset, to_rgb
from deit_distill.training.models import build_model
from deit_distill.training.models import parse_config_overrides as _overrides

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "training" / "recipes").glob("*.json"))
SEED = 42  # TrainingArguments' default, which also fixes the dataset subsets
NUM_TRAIN, NUM_EVAL = 128, 64
TINY_RUN = [
    "--max_train_samples", str(NUM_TRAIN),
    "--max_eval_samples", str(NUM_EVAL),
    "--image_size", "28",
    "--crop_pct", "1.0",
    "--augmentation", "none",
    "--mixup", "0",
    "--cutmix", "0",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--max_steps", "2",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip
TEACHER = [
    "--architecture",
    "resnet",
    "--config_overrides",
    "embedding_size=8,hidden_sizes=[8,16],depths=[1,1]",
]
STUDENT = [
    "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
    "--drop_path_rate", "0",
]  # fmt: skip


def plain(value):
    return value.value if isinstance(value, enum.Enum) else value


# ------------------------------------------------------------------------------------------------------------------
# Arguments.


def test_recipe_becomes_flags_and_later_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "_comment": "ignored",
                "learning_rate": 0.001,
                "per_device_train_batch_size": 32,
                "scale_lr": True,
                "lr_scheduler_kwargs": {"min_lr": 1e-5},
                "report_to": ["tensorboard"],
                "output_dir": str(tmp_path / "from_recipe"),
            }
        )
    )
    assert recipe_to_argv(recipe) == [
        "--learning_rate", "0.001",
        "--per_device_train_batch_size", "32",
        "--scale_lr", "True",
        "--lr_scheduler_kwargs", '{"min_lr": 1e-05}',
        "--report_to", "tensorboard",
        "--output_dir", str(tmp_path / "from_recipe"),
    ]  # fmt: skip

    model_args, _, _, distill_args, _, training_args, _ = parse_args(
        [
            str(recipe),
            "--learning_rate",
            "0.002",
            "--output_dir",
            str(tmp_path / "from_flag"),
            "--use_cpu",
            "true",
        ]
    )
    assert training_args.learning_rate == 0.002
    assert training_args.output_dir == str(tmp_path / "from_flag")
    assert training_args.per_device_train_batch_size == 32
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert training_args.report_to == ["tensorboard"]
    assert distill_args.scale_lr is True
    assert model_args.variant == "tiny"  # not in the recipe: the default


@pytest.mark.parametrize(
    ("per_device", "world_size", "accumulation", "expected"),
    [(128, 4, 1, 5e-4), (64, 4, 2, 5e-4), (256, 1, 1, 2.5e-4), (32, 2, 4, 2.5e-4)],
)
def test_scale_lr_uses_the_global_batch_of_world_size_times_accumulation(
    per_device, world_size, accumulation, expected
):
    args = SimpleNamespace(
        learning_rate=5e-4,
        per_device_train_batch_size=per_device,
        world_size=world_size,
        gradient_accumulation_steps=accumulation,
    )
    # DeiT: lr = 5e-4 * global batch / 512.
    assert scaled_learning_rate(args) == pytest.approx(expected)


def test_config_overrides_keep_list_values_whole():
    text = "embedding_size=16,hidden_sizes=[16,32],depths=[1, 1],layer_type=bottleneck,downsample_in_first_stage=false"
    assert _overrides(text) == {
        "embedding_size": 16,
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "layer_type": "bottleneck",
        "downsample_in_first_stage": False,
    }
    model = build_model(
        ModelArguments(architecture="resnet", config_overrides=text, image_size=28), {0: "a", 1: "b"}
    ).model
    assert isinstance(model.config, ResNetConfig)
    assert (model.config.hidden_sizes, model.config.depths, model.config.layer_type) == (
        [16, 32],
        [1, 1],
        "bottleneck",
    )
    assert model.config.id2label == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="key=value"):
        _overrides("oops,hidden_size=8")


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_recipe_parses_into_the_dataclasses(recipe, tmp_path):
    # The recipes ask for bf16, which TrainingArguments rejects on a machine without a GPU unless use_cpu is set.
    parsed = parse_args([str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert [type(group) for group in parsed[:5]] == [
        ModelArguments,
        DataArguments,
        AugmentationArguments,
        DistillationArguments,
        RunArguments,
    ]
    for key, value in json.loads(recipe.read_text()).items():
        if key.startswith("_") or key == "output_dir":
            continue
        owner = next(group for group in parsed if hasattr(group, key))
        got = plain(getattr(owner, key))
        if key == "report_to" and value == "none":
            value = []
        if isinstance(got, list) and not isinstance(value, list):
            value = [value]
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


# ------------------------------------------------------------------------------------------------------------------
# End to end: a convnet teacher through the console script, then distillation from its directory.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    teacher_dir, student_dir = root / "teacher", root / "student"
    console_script = Path(sys.executable).with_name("deit-distill")
    done = subprocess.run(
        [
            str(console_script),
            "train",
            *TEACHER,
            *TINY_RUN,
            "--distillation_type",
            "none",
            "--output_dir",
            str(teacher_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = main(
        [
            *STUDENT,
            *TINY_RUN,
            "--teacher", str(teacher_dir),
            "--distillation_type", "hard",
            "--per_device_train_batch_size", "16",
            "--gradient_accumulation_steps", "2",
            "--learning_rate", "0.01",
            "--scale_lr", "true",
            "--output_dir", str(student_dir),
        ]
    )  # fmt: skip
    return SimpleNamespace(teacher=teacher_dir, student=student_dir, metrics=metrics)


def test_console_script_trains_a_resnet_teacher(runs):
    config = json.loads((runs.teacher / "config.json").read_text())
    assert config["model_type"] == "resnet"
    assert [config["id2label"][str(i)] for i in range(10)] == list(FASHION_MNIST_CLASSES)
    for name in ("model.safetensors", "preprocessor_config.json", "eval_results.json"):
        assert (runs.teacher / name).is_file(), name
    assert json.loads((runs.teacher / "trainer_state.json").read_text())["global_step"] == 2


def test_distillation_run_records_its_settings(runs):
    info = json.loads((runs.student / "deit_distill_run.json").read_text())
    assert info["distillation"]["distillation_type"] == "hard"
    assert info["distillation"]["teacher"] == str(runs.teacher)
    assert info["data"]["num_train_examples"] == NUM_TRAIN
    assert info["data"]["num_eval_examples"] == NUM_EVAL
    assert info["data"]["eval_split_used"] == "test"  # Fashion-MNIST's own test split
    training = info["training"]
    assert (training["world_size"], training["gradient_accumulation_steps"]) == (1, 2)
    assert training["global_batch_size"] == 32
    # --scale_lr: 0.01 * (16 per device * 1 process * 2 accumulation) / 512.
    assert training["learning_rate"] == pytest.approx(0.01 * 32 / 512)


def test_distillation_run_reports_every_head_and_the_teacher(runs):
    results = json.loads((runs.student / "eval_results.json").read_text())
    expected = {f"eval_{head}_top{k}" for head in ("cls", "dist", "avg", "teacher") for k in (1, 5)}
    assert expected | {"eval_agreement", "eval_loss"} <= set(results)
    assert results == pytest.approx({k: v for k, v in runs.metrics.items() if k in results})
    card = (runs.student / "README.md").read_text()
    # The local teacher by its folder name, said to be local; never the path of the training machine.
    assert "distillation" in card and f"`{runs.teacher.name}` (a local model, not on the Hub)" in card
    assert str(runs.teacher) not in card


def test_run_directory_loads_with_remote_code_and_reproduces_its_accuracy(runs):
    model = AutoModelForImageClassification.from_pretrained(runs.student, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(runs.student)
    assert type(model).__name__ == "DeiTDistillForImageClassification"
    assert [model.config.id2label[i] for i in range(10)] == list(FASHION_MNIST_CLASSES)

    # The saved weights and processor give the accuracy the run reported on the same images.
    eval_split = load_image_dataset("fashion_mnist", train_subset=NUM_TRAIN, eval_subset=NUM_EVAL, seed=SEED)[
        "validation"
    ]
    pixel_values = processor(images=[to_rgb(image) for image in eval_split["image"]], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        predictions = model(pixel_values=pixel_values).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(eval_split["label"])).double().mean().item()
    results = json.loads((runs.student / "eval_results.json").read_text())
    assert accuracy == pytest.approx(results["eval_avg_top1"], abs=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# Errors before training.


def student_run(output_dir: Path, teacher: str) -> list[str]:
    return [
        *STUDENT,
        *TINY_RUN,
        "--max_train_samples",
        "32",
        "--teacher",
        teacher,
        "--output_dir",
        str(output_dir),
    ]


def test_missing_teacher_directory_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        main(student_run(tmp_path / "out", str(missing)))
    assert not (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.skipif(
    not huggingface_hub.constants.HF_HUB_OFFLINE, reason="a relative id would be tried on the Hub"
)
def test_missing_relative_teacher_path_is_named_in_the_error(tmp_path, monkeypatch):
    # Written as in the recipes ("runs/cifar10_teacher"): a path that is also a well-formed Hub id.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/no_such_teacher"):
        main(student_run(tmp_path / "out", "runs/no_such_teacher"))


def test_teacher_with_other_classes_fails_before_training_naming_both_label_sets(runs, tmp_path):
    teacher = AutoModelForImageClassification.from_pretrained(
        runs.teacher, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, ignore_mismatched_sizes=True
    )
    teacher.save_pretrained(tmp_path / "teacher")
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        main(student_run(output_dir, str(tmp_path / "teacher")))
    message = str(error.value)
    assert "3 classes [cat, dog, fox]" in message
    assert f"10 classes [{', '.join(FASHION_MNIST_CLASSES)}]" in message
    assert not (output_dir / "trainer_state.json").exists()
    assert not list(output_dir.glob("checkpoint-*"))
