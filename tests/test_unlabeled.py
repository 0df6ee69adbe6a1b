"""Unlabelled images (`--unlabeled_dataset`): they join the training split with the label `UNLABELED`, keep it
through the collator, and contribute only the distillation term to the loss."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_data import needs_fashion_mnist

from deit_distill.training.arguments import DataArguments
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.data import UNLABELED, count_unlabeled
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.run_record import RUN_RECORD_FILE
from deit_distill.training.views import ViewKey, mix_generator

TINY = [
    "--config_overrides", "patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2",
    "--image_size", "16",
    "--per_device_train_batch_size", "4",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip


def _images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlabeled")
    for label in ("circle", "square"):
        _images(root / "shapes" / label, [f"{i}.png" for i in range(6)], seed=len(label))
    # Unlabelled: a flat folder plus a sub-folder whose name must not become a label.
    _images(root / "pool", [f"u{i}.png" for i in range(5)], seed=10)
    _images(root / "pool" / "circle", ["u5.png", "u6.png"], seed=11)
    return {"labelled": root / "shapes", "unlabeled": root / "pool"}


def test_a_folder_of_unlabelled_images_follows_the_labelled_ones_in_train(data):
    args = DataArguments(dataset_name=str(data["labelled"]), unlabeled_dataset=str(data["unlabeled"]))
    dataset = args.load(seed=0)
    train = dataset["train"]
    labels = np.asarray(train["label"])
    assert count_unlabeled(train) == 7
    assert (labels[-7:] == UNLABELED).all() and (labels[:-7] >= 0).all()
    assert train.features["label"].names == ["circle", "square"]  # the pool's sub-folder is not a class
    assert len(dataset["validation"]) == 1 and min(dataset["validation"]["label"]) >= 0
    assert count_unlabeled(args.load(seed=0, unlabeled=False)["train"]) == 0
    subset = DataArguments(
        dataset_name=str(data["labelled"]), unlabeled_dataset=str(data["unlabeled"]), max_unlabeled_samples=3
    )
    assert count_unlabeled(subset.load(seed=0)["train"]) == 3


@needs_fashion_mnist
def test_the_training_data_itself_gives_its_rows_outside_the_labelled_subset(tmp_path):
    args = DataArguments(max_train_samples=200, unlabeled_dataset="fashion_mnist", max_eval_samples=10)
    train = args.load(seed=3, cache_dir=str(tmp_path))["train"]
    assert len(train) == 60_000 and count_unlabeled(train) == 59_800
    labels = np.asarray(train.select_columns(["label"])["label"])
    images = train.cast_column("image", datasets.Image(decode=False))

    def image_bytes(rows: np.ndarray) -> set[bytes]:
        return {value["bytes"] for value in images.select(rows)["image"]}

    # The labelled rows are the ones a plain 200-image run trains on, and none of them is also unlabelled.
    plain = DataArguments(max_train_samples=200, max_eval_samples=10).load(seed=3, cache_dir=str(tmp_path))
    labelled = np.flatnonzero(labels >= 0)
    assert image_bytes(labelled) == {value["bytes"] for value in plain["train"].cast_column(
        "image", datasets.Image(decode=False))["image"]}  # fmt: skip
    assert not image_bytes(labelled) & image_bytes(np.flatnonzero(labels < 0))


def test_the_collator_keeps_unlabelled_labels_and_zeroes_their_share_of_mixed_targets():
    labels = [0, UNLABELED, UNLABELED, 2, 1, UNLABELED]
    examples = [{"pixel_values": torch.full((3, 8, 8), float(i)), "labels": y} for i, y in enumerate(labels)]
    plain = DistillationCollator(num_classes=3)(examples)
    assert plain["labels"].tolist() == labels
    collator = DistillationCollator(num_classes=3, mixup_alpha=0.8, label_smoothing=0.1, switch_prob=0.0)
    views = [ViewKey(seed=0, epoch=0, batch=5, index=i, repeat=0, position=i) for i in range(6)]
    batch = collator(examples, views)
    lam, _ = collator.mix_params(mix_generator(views[0]), (8, 8))
    assert lam != 1.0
    smooth = lambda y: torch.full((3,), 0.1 / 3) + 0.9 * F.one_hot(torch.tensor(y), 3)  # noqa: E731
    zero = torch.zeros(3)
    expected = torch.stack(
        [
            lam * smooth(0) + (1 - lam) * zero,  # labelled, mixed with an unlabelled image
            lam * zero + (1 - lam) * smooth(0),
            lam * zero + (1 - lam) * smooth(2),
            lam * smooth(2) + (1 - lam) * zero,
            lam * smooth(1) + (1 - lam) * zero,
            lam * zero + (1 - lam) * smooth(1),
        ]
    )
    torch.testing.assert_close(batch["labels"], expected)


def _per_image_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits.double(), -1)).sum(-1)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_unlabelled_images_contribute_only_the_distillation_term(kind):
    torch.manual_seed(0)
    cls, dist, teacher = (torch.randn(6, 4) for _ in range(3))
    labels = torch.tensor([1, UNLABELED, 3, UNLABELED, UNLABELED, 0])
    outputs = type("Out", (), {"cls_logits": cls, "distillation_logits": dist})()
    loss = DistillationLoss(kind, alpha=0.3, tau=2.0, label_smoothing=0.1)(outputs, labels, teacher)
    labelled = labels >= 0
    smooth = torch.full((6, 4), 0.1 / 4, dtype=torch.float64)
    smooth[labelled] += 0.9 * F.one_hot(labels[labelled], 4)
    base = (_per_image_ce(cls, smooth) * labelled).sum() / 6  # masked, divided by the whole batch
    if kind == "hard":
        term = _per_image_ce(dist, F.one_hot(teacher.argmax(-1), 4).double()).mean()
    else:
        p = torch.softmax(teacher.double() / 2, -1)
        term = (p * (p.log() - torch.log_softmax(dist.double() / 2, -1))).sum() * 4 / (6 * 4)
    torch.testing.assert_close(loss.loss.double(), 0.7 * base + 0.3 * term)
    # The same with the collator's soft targets (an unmixed batch's rows: smoothed one-hot, or zeros).
    soft = torch.where(labelled[:, None], smooth, 0.0).float()
    torch.testing.assert_close(
        DistillationLoss(kind, alpha=0.3, tau=2.0)(outputs, soft, teacher).loss.double(), loss.loss.double()
    )


def test_an_unlabelled_image_leaves_the_cls_head_without_gradient():
    from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification

    config = DeiTDistillConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=3
    )
    model = DeiTDistillForImageClassification(config)
    outputs = model(pixel_values=torch.randn(2, 3, 16, 16))
    loss = DistillationLoss("hard", alpha=0.5)(outputs, torch.tensor([UNLABELED] * 2), torch.randn(2, 3))
    loss.loss.backward()
    assert model.cls_classifier.weight.grad.abs().sum() == 0
    assert model.distillation_classifier.weight.grad.abs().sum() > 0


def test_train_with_unlabelled_images_records_them(data, tmp_path):
    teacher = tmp_path / "teacher"
    assert cli(["train", *TINY, "--dataset_name", str(data["labelled"]), "--distillation_type", "none",
                "--max_steps", "1", "--output_dir", str(teacher)]) == 0  # fmt: skip
    student = tmp_path / "student"
    argv = ["train", *TINY, "--dataset_name", str(data["labelled"]), "--unlabeled_dataset", str(data["unlabeled"]),
            "--teacher", str(teacher), "--num_train_epochs", "1", "--output_dir", str(student)]  # fmt: skip
    assert cli(argv) == 0
    record = json.loads((student / RUN_RECORD_FILE).read_text())
    assert record["data"]["num_unlabeled_examples"] == 7
    assert record["data"]["num_train_examples"] == 11 + 7  # 12 images, 1 held out for evaluation
    card = (student / "README.md").read_text()
    # A local folder is named by its folder name, never by the path of the training machine.
    unlabeled = f"`{data['unlabeled'].name}` (a local dataset, not on the Hub)"
    assert f"| unlabelled images from (distillation term only) | {unlabeled} |" in card
    assert str(data["unlabeled"]) not in card
    assert "| of which unlabelled | 7 |" in card
    assert "unlabeled_split" not in (teacher / "README.md").read_text()  # a run without them shows none
    state = json.loads((student / "trainer_state.json").read_text())
    assert state["global_step"] == 5  # ceil(18 / 4): the unlabelled images are in the epoch


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--distillation_type", "none"], "--unlabeled_dataset {pool}: unlabelled images train only through"),
        (["--unlabeled_dataset", "{missing}"], "--unlabeled_dataset {missing}: no such folder"),
        (["--max_unlabeled_samples", "0"], "--max_unlabeled_samples must be a positive number"),
    ],
)
def test_bad_unlabelled_arguments_get_one_line_before_anything_is_written(
    data, tiny_model_dir, tmp_path, capsys, flags, named
):
    names = {"pool": str(data["unlabeled"]), "missing": str(tmp_path / "nowhere")}
    out = tmp_path / "run"
    argv = ["train", *TINY, "--max_steps", "1", "--dataset_name", str(data["labelled"]),
            "--unlabeled_dataset", names["pool"], "--distillation_type", "hard", "--teacher", str(tiny_model_dir),
            *[flag.format(**names) for flag in flags], "--output_dir", str(out)]  # fmt: skip
    assert cli(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deit-distill: error: " + named.format(**names)), err
    assert not any(line.startswith("Traceback") for line in err)
    assert not out.exists()


def test_the_training_data_without_a_labelled_subset_is_refused(data, tiny_model_dir, tmp_path, capsys):
    argv = ["train", *TINY, "--max_steps", "1", "--dataset_name", str(data["labelled"]),
            "--unlabeled_dataset", str(data["labelled"]), "--distillation_type", "hard",
            "--teacher", str(tiny_model_dir), "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert cli(argv) != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is the training data itself" in line and "--max_train_samples" in line
    assert not (tmp_path / "run").exists()
