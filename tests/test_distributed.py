"""Two-process data-parallel distillation on CPU (gloo) gives the run a single process makes with the same global
batch: same per-step losses, same final weights, same evaluation.

Why the two runs see the same data: the trainer's `ViewSampler` yields one seeded global order of views, and
accelerate deals its batches of 16 out in turn (batch 2k to rank 0, 2k+1 to rank 1), so global step k covers the
same 32 views as step k of the single process with batches of 32. The full DeiT recipe is on (RandomResizedCrop,
RandAugment, random erasing, repeated augmentation, Mixup/CutMix, 2 data-loader workers per process): each view
is drawn from (seed, epoch, index, repeat) and each global batch's mixing from (seed, epoch, batch), and examples
are mixed with their neighbour, so a per-rank half of a global batch is augmented and mixed exactly as in the
single process. Drop path is off: it draws per process. DDP averages the per-rank mean gradients, which equals
the mean over 32 examples.

The teacher is a module with no trainable parameter: had the trainer wrapped it in DistributedDataParallel, DDP
would refuse it, so a successful run also shows it is not wrapped.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from processes import run_offline
from safetensors.torch import load_file
from transformers import ResNetConfig, ResNetForImageClassification

from deit_distill.modeling_deit_distill import build_image_processor
from deit_distill.training.commands.train import main
from deit_distill.training.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, STEPS = 32, 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_teacher(path: Path) -> None:
    """A random ResNet on the Fashion-MNIST labels with its own normalisation (ImageNet's, unlike the student)."""
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_CLASSES)},
    )
    config.image_size = 28
    ResNetForImageClassification(config).save_pretrained(path)
    build_image_processor(config, crop_pct=1.0).save_pretrained(path)


def run_args(output_dir: Path, teacher: Path, per_device_batch: int) -> list[str]:
    return [
        "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
        "--drop_path_rate", "0",
        "--teacher", str(teacher),
        "--distillation_type", "hard",
        "--max_train_samples", str(GLOBAL_BATCH * STEPS),
        "--max_eval_samples", "64",
        "--image_size", "28",
        "--crop_pct", "1.0",
        "--image_mean", "0.3,0.3,0.3",
        "--image_std", "0.35,0.35,0.35",
        "--augmentation", "deit",
        "--mixup", "0.8",
        "--cutmix", "1.0",
        "--repeated_augmentations", "3",
        "--dataloader_num_workers", "2",
        "--per_device_train_batch_size", str(per_device_batch),
        "--per_device_eval_batch_size", "32",
        "--max_steps", str(STEPS),
        "--logging_steps", "1",
        "--learning_rate", "0.016",
        "--scale_lr", "true",
        "--seed", "0",
        "--use_cpu", "true",
        "--report_to", "none",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def train_logs(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    teacher = tmp_path / "teacher"
    save_teacher(teacher)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"

    # `--cpu --num_processes 2` would silently run one process; MULTI_GPU with use_cpu runs two (see the config).
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "training" / "accelerate_configs" / "cpu_ddp.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "training" / "train.py"),
        *run_args(ddp_dir, teacher, per_device_batch=GLOBAL_BATCH // 2),
    ]  # fmt: skip
    done = run_offline(command)
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = re.findall(r"Process (\d+) of world_size=(\d+)", done.stderr)
    assert sorted(ranks) == [("0", "2"), ("1", "2")]

    single_metrics = main(run_args(single_dir, teacher, per_device_batch=GLOBAL_BATCH))

    # The run records the actual world size, and --scale_lr used it: 0.016 * (16 * 2 processes) / 512.
    training = json.loads((ddp_dir / "deit_distill_run.json").read_text())["training"]
    assert (training["world_size"], training["global_batch_size"]) == (2, GLOBAL_BATCH)
    assert training["learning_rate"] == pytest.approx(0.016 * GLOBAL_BATCH / 512)

    ddp_logs, single_logs = train_logs(ddp_dir), train_logs(single_dir)
    assert [entry["step"] for entry in ddp_logs] == [entry["step"] for entry in single_logs] == [1, 2, 3, 4]
    for ddp, single in zip(ddp_logs, single_logs, strict=True):
        for key in ("loss", "base_loss", "distillation_loss", "learning_rate"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4), (ddp["step"], key)

    ddp_weights = load_file(ddp_dir / "model.safetensors")
    single_weights = load_file(single_dir / "model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # Evaluation gathers both ranks' predictions without duplicates: the same 64 images, the same accuracies.
    ddp_metrics = json.loads((ddp_dir / "eval_results.json").read_text())
    for key in ("eval_cls_top1", "eval_dist_top1", "eval_avg_top1", "eval_teacher_top1", "eval_agreement"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], abs=1e-9), key
    assert ddp_metrics["eval_loss"] == pytest.approx(single_metrics["eval_loss"], rel=1e-4)
