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
import os
import re
import socket
import subprocess
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


# ------------------------------------------------------------------------------------------------------------------
# The teacher under every shipped launcher: what can be checked without a GPU. The FSDP2 and DeepSpeed runs
# themselves are sections of bench/gpu_check.py.


def test_shipped_launcher_configs_load_with_accelerate_and_name_our_layer():
    from accelerate.commands.config.config_args import load_config_from_file

    from deit_distill.modeling_deit_distill import modeling_deit_distill

    configs = {path.stem: path for path in (ROOT / "training" / "accelerate_configs").glob("*.yaml")}
    assert set(configs) == {"cpu_ddp", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"}
    loaded = {name: load_config_from_file(str(path)) for name, path in configs.items()}
    assert {name: config.distributed_type.value for name, config in loaded.items()} == {
        "cpu_ddp": "MULTI_GPU",
        "multi_gpu": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
        "fsdp": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    fsdp = loaded["fsdp"].fsdp_config
    assert fsdp["fsdp_version"] == 2
    # FSDP's auto-wrap finds layers by class name: it must be a class of the shipped model.
    assert hasattr(modeling_deit_distill, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    assert loaded["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2


# What `accelerate launch --config_file YAML` hands a process (accelerate's own launch code), then what transformers'
# Trainer does with it (`HfTrainerDeepSpeedConfig`): a fixed DeepSpeed value that differs from the run's
# TrainingArguments stops the run before its first step ("Please correct the following DeepSpeed config values").
DEEPSPEED_MATCH_CHECK = """
import json, os, sys
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env
from deit_distill.training.commands.train import parse_args
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
config_file, cases = sys.argv[1], json.loads(sys.argv[2])
launch = launch_command_parser().parse_args(["--config_file", config_file, "--num_processes", "1", "train.py"])
launch, defaults, precision_from_config = _validate_launch_command(launch)
fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_config else [])]
launch.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
os.environ.update(prepare_deepspeed_cmd_env(launch)[1])
mismatches = {}
for name, argv in cases.items():
    args = parse_args([*argv, "--output_dir", "/tmp/unused", "--use_cpu", "true", "--bf16", "false"])[5]
    config = HfTrainerDeepSpeedConfig(DeepSpeedPlugin().deepspeed_config)
    config.trainer_config_process(args)
    mismatches[name] = config.mismatches
print(json.dumps(mismatches))
"""


@pytest.mark.parametrize("config", sorted((ROOT / "training" / "accelerate_configs").glob("deepspeed*.yaml")))
def test_shipped_deepspeed_configs_leave_to_the_run_what_its_flags_set(config, tmp_path):
    """Without deepspeed installed, a stand-in distribution (name and version only) lets transformers' DeepSpeed
    config class load, in a subprocess of its own; nothing of DeepSpeed itself runs."""
    fake = tmp_path / "site"
    (fake / "deepspeed").mkdir(parents=True)
    (fake / "deepspeed" / "__init__.py").write_text('__version__ = "0.19.8"\n')
    (fake / "deepspeed-0.19.8.dist-info").mkdir()
    (fake / "deepspeed-0.19.8.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n"
    )
    recipes = {path.name: [str(path)] for path in sorted((ROOT / "training" / "recipes").glob("*.json"))}
    cases = {
        **recipes,
        "defaults": [],
        "accumulation, clipping, batch": ["--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5",
                                          "--per_device_train_batch_size", "8", "--learning_rate", "1e-4"],
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_MATCH_CHECK, str(config), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(fake), *sys.path])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mismatches = json.loads(done.stdout.strip().splitlines()[-1])
    assert mismatches == {name: [] for name in cases}


class _FakeZero3Config:
    """What transformers' `is_deepspeed_zero3_enabled()` reads while a ZeRO-3 run's TrainingArguments exist."""

    config: dict = {"zero_optimization": {"stage": 3}}

    def is_zero3(self) -> bool:
        return True


def test_teacher_loads_whole_while_a_zero3_or_fsdp_rank0_loading_config_is_active(tmp_path, monkeypatch):
    import weakref

    from transformers.integrations import deepspeed as hf_deepspeed

    from deit_distill.training.teacher import load_teacher

    save_teacher(tmp_path / "teacher")
    zero3 = _FakeZero3Config()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(zero3))
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert hf_deepspeed.is_deepspeed_zero3_enabled()

    # With ZeRO-3 on, from_pretrained would build the model under deepspeed.zero.Init (partitioned; here, with
    # no deepspeed installed, an ImportError). The teacher is loaded whole, with the saved weights.
    teacher = load_teacher(str(tmp_path / "teacher"))
    saved = load_file(tmp_path / "teacher" / "model.safetensors")
    for name, value in teacher.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert all(p.numel() > 0 and not p.requires_grad for p in teacher.parameters())
    # Both switches are restored for the student.
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    assert __import__("os").environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_teacher_is_placed_by_hand_and_runs_in_the_run_precision_without_accelerate_autocast(
    tmp_path, precision
):
    from test_trainer import ImageTensors, make_student, make_teacher, training_args

    from deit_distill.training.trainer import DistillationTrainer

    teacher = make_teacher()
    trainer = DistillationTrainer(
        model=make_student(), args=training_args(tmp_path, bf16=precision == "bf16"), teacher=teacher
    )
    # DeepSpeed: accelerate applies no native autocast (it casts the engine's model itself). The teacher must not
    # depend on it.
    trainer.accelerator.native_amp = False
    assert trainer.teacher is teacher and not any(m is teacher for m in trainer.accelerator._models)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device == trainer.args.device

    seen: list[torch.dtype] = []
    teacher.resnet.embedder.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    pixel_values = ImageTensors(4, seed=3).pixel_values
    logits = trainer.teacher_logits(pixel_values)
    expected_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == [expected_dtype]
    # Reference: the same teacher under a hand-written autocast (or none).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        reference = teacher(pixel_values).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_an_uneven_epoch_under_several_processes_is_refused_before_the_first_step_with_a_cache(tmp_path):
    from test_trainer import ImageTensors, make_student, training_args

    from deit_distill.training.errors import UserError
    from deit_distill.training.losses import DistillationLoss
    from deit_distill.training.trainer import DistillationTrainer
    from deit_distill.training.views import SeededViews

    class TwoProcessArgs(type(training_args(tmp_path))):
        world_size = 2  # the layout of `accelerate launch --num_processes 2`

    class CacheWriter(DistillationTrainer):
        keep_view_keys = True  # as a cache reader or `cache-teacher`

    def trainer(examples: int, **overrides) -> DistillationTrainer:
        args = training_args(tmp_path, per_device_train_batch_size=4, **overrides)
        args.__class__ = TwoProcessArgs
        return CacheWriter(
            model=make_student(),
            args=args,
            distillation_loss=DistillationLoss("none"),
            train_dataset=ImageTensors(examples, seed=0),
        )

    # 20 views in global batches of 4 x 2 = 8: the last batch would be padded. Refused when the loader is built,
    # with the numbers and the flag.
    with pytest.raises(UserError, match=r"20 views .* global batches of 8 .*--dataloader_drop_last true"):
        trainer(20).get_train_dataloader()
    # Whole global batches, or drop_last: accepted.
    trainer(24)._check_view_layout(SeededViews(ImageTensors(24, seed=0)))
    trainer(20, dataloader_drop_last=True)._check_view_layout(SeededViews(ImageTensors(20, seed=0)))
