"""Everything the GPU path needs checked, in one run that fits a short GPU lease (about 2 minutes on one H100).

    python bench/gpu_check.py --out gpu_results          # on a CUDA machine
    python bench/gpu_check.py --smoke --out /tmp/smoke   # on the CPU, in seconds (what the tests run)

1. Correctness: 20 bf16 (autocast) training steps of DeiT-S with hard distillation from a RegNetY-16GF-sized
   timm convnet (random weights), on one fixed batch repeated so the loss can fall: eager against
   `torch.compile`, and sdpa against eager attention. Checks: no NaN or inf, the loss falls, and the losses
   agree within bf16 tolerance.
2. Training throughput at 224 (images/s), the math of a `DistillationTrainer` step written out: student
   forward and backward under bf16 autocast, the frozen teacher's forward under no_grad on the same batch,
   `DistillationLoss`, fused AdamW with the no-weight-decay groups. Student alone, live teacher, and a teacher
   cache row when `deit_distill.training.teacher_cache` exists. Pre-made batches on the GPU, so no data loading is timed.
3. Data feed: images/s that the DeiT training pipeline (`decode_image`, then
   `build_train_transform(build_image_processor(config), "deit")`) delivers through a torch DataLoader with
   8 and 16 workers, on JPEGs of ImageNet-like sizes written by this script, set against the step rates of 2.
4. The GPU rows of `bench/inference.py` (its own functions): DeiT-Ti/S/B, batch 1 and 256, bf16, ours against
   transformers and timm with the same weights.

6. `--sections device_feed` (asked for by name; bench/gpu_device_feed.py, issue 19): `deit-distill train` end to
   end on a folder of JPEGs, `--augment_on device` against `workers`, from a teacher cache and with a live teacher;
   images/s read from the run, the GPU share of the augmentation.

5. `--sections launchers` (asked for by name; bench/gpu_launchers.py): `deit-distill train` under the FSDP2, DeepSpeed
   ZeRO-2 and DDP configs, with a live teacher and from a teacher cache, killed mid-run and resumed, its losses
   against the DDP run's. With `--smoke` only the DDP rows run (on the CPU), the others are skipped with the reason.

Results go to `--out` as `results.json` and `results.md`, rewritten after every section, so a run cut short
still leaves what it measured. Exit status 0 means every correctness check passed and no section failed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import transformers
from inference import TABLE_HEADER as INFERENCE_TABLE_HEADER
from inference import benchmark_variant
from inference import format_row as format_inference_row
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    build_image_processor,
)
from deit_distill.training.data import decode_image
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.transforms import build_train_transform

LEARNING_RATE, WEIGHT_DECAY, LABEL_SMOOTHING = 5e-4, 0.05, 0.1
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%). The first loss (same weights, same batch) sees
# only rounding. Later losses also carry AdamW updates made from slightly different gradients, and memorising
# one random batch gets chaotic near its end: on an H100 a single late step's loss moved by 5% between sdpa and
# eager attention while the curves had agreed to 0.1% for 14 steps. So the end of the run is compared on the
# mean of its last losses, and the largest single-step gap is reported, not judged.
FIRST_STEP_TOLERANCE, FINAL_MEAN_TOLERANCE, FINAL_STEPS = 1e-2, 2e-2, 5
VARIANT_NAMES = {"tiny": "DeiT-Ti", "small": "DeiT-S", "base": "DeiT-B"}


@dataclass(frozen=True)
class Profile:
    """The sizes of a run: the real GPU run, or the seconds-long CPU smoke run the tests drive."""

    name: str
    student_overrides: dict[str, Any]  # on top of DeiTDistillConfig.from_variant
    num_labels: int
    teacher: str  # a timm model name, random weights
    compile_backend: str
    autocast_dtype: torch.dtype
    batch_size: int
    correctness_steps: int
    train_variants: dict[str, bool]  # variant -> also the compiled / channels_last / cache rows
    warmup_steps: int
    timed_steps: int
    repeats: int
    jpeg_count: int
    jpeg_sizes: tuple[tuple[int, int], ...]
    feed_workers: tuple[int, ...]
    feed_images: int  # per worker setting, after the first batch
    feed_images_in_process: int
    inference_variants: tuple[str, ...]
    inference_batch_sizes: tuple[int, ...]
    inference_repeats: int
    inference_images_per_repeat: int
    inference_max_calls: int


GPU = Profile(
    name="gpu",
    student_overrides={},
    num_labels=1000,
    teacher="regnety_160",
    compile_backend="inductor",
    autocast_dtype=torch.bfloat16,
    batch_size=256,
    correctness_steps=20,
    train_variants={"small": True, "tiny": False, "base": False},
    warmup_steps=3,
    timed_steps=10,
    repeats=3,
    jpeg_count=384,
    # ImageNet's commonest training-image shapes: 500x375, 500x333 and their portrait versions.
    jpeg_sizes=((500, 375), (500, 333), (375, 500), (333, 500), (500, 400), (500, 500)),
    feed_workers=(8, 16),
    feed_images=256 * 32,
    feed_images_in_process=512,
    inference_variants=("tiny", "small", "base"),
    inference_batch_sizes=(1, 256),
    inference_repeats=5,
    inference_images_per_repeat=2048,
    inference_max_calls=64,
)

SMOKE = Profile(
    name="smoke",
    # Every variant shrunk to one tiny shape: bf16 matrix products are emulated, and slow, on most CPUs.
    student_overrides={
        "image_size": 32,
        "patch_size": 8,
        "num_hidden_layers": 2,
        "hidden_size": 48,
        "num_attention_heads": 3,
        "intermediate_size": 96,
    },
    num_labels=10,
    teacher="resnet10t",  # no grouped convolutions: bf16 grouped ones take a slow path on the CPU
    compile_backend="eager",  # dynamo's tracing without inductor's C++ build, which takes minutes on a CPU
    # CPUs without bf16 units emulate it, several times slower than fp32; the code path is the same.
    autocast_dtype=torch.float32,
    batch_size=8,
    correctness_steps=4,
    train_variants={"small": True, "tiny": False},
    warmup_steps=1,
    timed_steps=2,
    repeats=1,
    jpeg_count=6,
    jpeg_sizes=((64, 48), (48, 64)),
    feed_workers=(2,),
    feed_images=16,
    feed_images_in_process=8,
    inference_variants=("tiny",),
    inference_batch_sizes=(1,),
    inference_repeats=1,
    inference_images_per_repeat=1,
    inference_max_calls=1,
)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision as the Trainer's `bf16=True` sets it up; float32 turns it off."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- models


def build_student(profile: Profile, variant: str, attn_implementation: str = "sdpa") -> nn.Module:
    config = DeiTDistillConfig.from_variant(
        variant, num_labels=profile.num_labels, **profile.student_overrides
    )
    model = DeiTDistillForImageClassification(config)
    model.set_attn_implementation(attn_implementation)
    return model


_TEACHERS: dict[tuple[str, str], nn.Module] = {}


def build_teacher(profile: Profile, device: torch.device) -> nn.Module:
    """The frozen teacher, built once per process (RegNetY-16GF's random init takes seconds)."""
    key = (profile.name, str(device))
    if key not in _TEACHERS:
        torch.manual_seed(1)
        teacher = timm.create_model(profile.teacher, pretrained=False, num_classes=profile.num_labels)
        _TEACHERS[key] = teacher.to(device).eval().requires_grad_(False)
    return _TEACHERS[key]


def image_size(profile: Profile) -> int:
    return profile.student_overrides.get("image_size", 224)


@dataclass
class TrainRun:
    """A student and its optimizer; `step` is one DistillationTrainer step's math."""

    student: nn.Module
    forward: nn.Module  # the student, or its torch.compile wrapper (same parameters)
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def create(
        cls,
        profile: Profile,
        variant: str,
        device: torch.device,
        attn_implementation: str = "sdpa",
        compiled: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> TrainRun:
        torch.manual_seed(0)
        student = build_student(profile, variant, attn_implementation)
        if state_dict is not None:
            student.load_state_dict(state_dict)
        student.to(device).train()
        # The Trainer's default optimizer (adamw_torch_fused) with DistillationTrainer's no-decay groups.
        no_decay = student.no_weight_decay()
        named = list(student.named_parameters())
        groups = [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, eps=1e-8, fused=device.type == "cuda")
        forward = torch.compile(student, backend=profile.compile_backend) if compiled else student
        return cls(student, forward, optimizer, device, profile.autocast_dtype)

    def step(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        loss_fn: DistillationLoss,
        teacher: nn.Module | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            outputs = self.forward(pixel_values=pixels)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(pixels)
            loss = loss_fn(outputs, labels, teacher_logits).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class ChannelsLast(nn.Module):
    """A convnet in channels_last, fed channels_last input: the layout of cuDNN's fastest bf16 convolutions."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels.contiguous(memory_format=torch.channels_last))


def fixed_batch(profile: Profile, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = image_size(profile)
    pixels = torch.randn(profile.batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, profile.num_labels, (profile.batch_size,), generator=generator)
    return pixels.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------- correctness

CORRECTNESS_RUNS = {  # name -> (attention, compiled)
    "eager, sdpa": ("sdpa", False),
    "eager, eager attention": ("eager", False),
    "compiled, sdpa": ("sdpa", True),
}
COMPARISONS = (("compiled, sdpa", "eager, sdpa"), ("eager, sdpa", "eager, eager attention"))


def check_correctness(profile: Profile, device: torch.device, runs: dict[str, TrainRun]) -> dict[str, Any]:
    """Train the same DeiT-S from the same weights in each mode; fills `runs` for the throughput section."""
    teacher = build_teacher(profile, device)
    torch.manual_seed(0)
    state_dict = build_student(profile, "small").state_dict()
    pixels, labels = fixed_batch(profile, device)
    loss_fn = DistillationLoss("hard", alpha=0.5, label_smoothing=LABEL_SMOOTHING)
    losses: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, (attention, compiled) in CORRECTNESS_RUNS.items():
        run = TrainRun.create(profile, "small", device, attention, compiled, state_dict)
        start = time.perf_counter()
        losses[name] = [
            run.step(pixels, labels, loss_fn, teacher).item() for _ in range(profile.correctness_steps)
        ]
        seconds[name] = time.perf_counter() - start  # includes compilation for the compiled run
        if attention == "sdpa":  # kept, warm and compiled, for the throughput section
            runs[name] = run
        log(f"  {name}: loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f} ({seconds[name]:.1f} s)")

    checks = []
    for name, values in losses.items():
        checks.append({"check": f"{name}: every loss finite", "passed": all(map(math.isfinite, values))})
        checks.append(
            {
                "check": f"{name}: loss falls",
                "passed": values[-1] < values[0],
                "detail": f"{values[0]:.4f} -> {values[-1]:.4f}",
            }
        )
    for name, reference in COMPARISONS:
        relative = [abs(a - b) / abs(b) for a, b in zip(losses[name], losses[reference], strict=True)]
        checks.append(
            {
                "check": f"{name} vs {reference}: first loss within {FIRST_STEP_TOLERANCE:.0e} (relative)",
                "passed": relative[0] <= FIRST_STEP_TOLERANCE,
                "detail": f"{relative[0]:.2e}",
            }
        )
        last = min(FINAL_STEPS, len(relative))
        final = abs(statistics.mean(losses[name][-last:]) / statistics.mean(losses[reference][-last:]) - 1)
        checks.append(
            {
                "check": f"{name} vs {reference}: mean of the last {last} losses within "
                f"{FINAL_MEAN_TOLERANCE:.0e} (relative)",
                "passed": final <= FINAL_MEAN_TOLERANCE,
                "detail": f"{final:.2e}; largest single-step gap {max(relative):.2e} at step "
                f"{relative.index(max(relative)) + 1}",
            }
        )
    return {
        "student": "small",
        "dtype": str(profile.autocast_dtype).removeprefix("torch."),
        "teacher": profile.teacher,
        "batch_size": profile.batch_size,
        "steps": profile.correctness_steps,
        "losses": losses,
        "seconds": seconds,
        "checks": checks,
        "passed": all(check["passed"] for check in checks),
    }


# ------------------------------------------------------------------------------------ training throughput


def time_steps(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds per step, wall clock, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def training_modes(
    profile: Profile, device: torch.device, runs: dict[str, TrainRun]
) -> tuple[dict[str, tuple[dict[str, Any], Callable[[], Any]]], dict[str, str]]:
    """Name -> (row fields, one step). Modes whose setup fails are left out and their error returned."""
    teacher = build_teacher(profile, device)
    teacher_cl = ChannelsLast(copy.deepcopy(teacher))
    pixels, labels = fixed_batch(profile, device)
    none = DistillationLoss("none", label_smoothing=LABEL_SMOOTHING)
    hard = DistillationLoss("hard", alpha=0.5, label_smoothing=LABEL_SMOOTHING)
    has_cache = importlib.util.find_spec("deit_distill.training.teacher_cache") is not None
    modes: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {}
    errors: dict[str, str] = {}

    def get_run(variant: str, compiled: bool) -> TrainRun:
        key = f"{'compiled' if compiled else 'eager'}, sdpa"
        if variant == "small" and key in runs:
            return runs[key]  # warmed up (and compiled) by the correctness section
        runs[f"{variant}, {key}"] = run = TrainRun.create(profile, variant, device, "sdpa", compiled)
        return run

    def add(fields: dict[str, Any], setup: Callable[[], Callable[[], Any]]) -> None:
        name = " | ".join(str(value) for value in fields.values())
        try:
            modes[name] = (fields, setup())
        except Exception:
            errors[name] = traceback.format_exc()
            log(f"  setup failed: {name}\n{errors[name]}")

    def student_step(run_fn: Callable[[], TrainRun], loss_fn, teacher_module=None, logits=None):
        def setup() -> Callable[[], Any]:
            run = run_fn()
            return lambda: run.step(pixels, labels, loss_fn, teacher_module, logits)

        return setup

    def teacher_forward(module: nn.Module, inputs: torch.Tensor) -> Callable[[], Callable[[], Any]]:
        def step() -> torch.Tensor:
            with torch.no_grad(), autocast(device, profile.autocast_dtype):
                return module(inputs)

        return lambda: step

    for variant, all_rows in profile.train_variants.items():
        model = VARIANT_NAMES[variant]
        compile_options = (False, True) if all_rows else (False,)
        for compiled in compile_options:
            student = "compiled" if compiled else "eager"
            run_fn = functools.partial(get_run, variant, compiled)  # built when its mode is set up
            add(
                {"model": model, "mode": "student only", "student": student, "teacher": "-"},
                student_step(run_fn, none),
            )
            add(
                {"model": model, "mode": "live teacher", "student": student, "teacher": "NCHW"},
                student_step(run_fn, hard, teacher),
            )
            if all_rows and compiled:
                add(
                    {"model": model, "mode": "live teacher", "student": student, "teacher": "channels_last"},
                    student_step(run_fn, hard, teacher_cl),
                )
                if has_cache:
                    # What any cache hands the loss: the teacher's logits, already computed (lookup excluded).
                    with torch.no_grad(), autocast(device, profile.autocast_dtype):
                        cached = teacher(pixels).detach()
                    add(
                        {
                            "model": model,
                            "mode": "teacher cache",
                            "student": student,
                            "teacher": "cached logits",
                        },
                        student_step(run_fn, hard, None, cached),
                    )
    teacher_name = f"{profile.teacher} forward (no_grad)"
    add(
        {"model": teacher_name, "mode": "teacher only", "student": "-", "teacher": "NCHW"},
        teacher_forward(teacher, pixels),
    )
    add(
        {"model": teacher_name, "mode": "teacher only", "student": "-", "teacher": "channels_last"},
        teacher_forward(teacher_cl, pixels),
    )
    if not has_cache:
        errors["teacher cache"] = (
            "skipped: deit_distill.training.teacher_cache does not exist in this checkout"
        )
    return modes, errors


def training_throughput(profile: Profile, device: torch.device, runs: dict[str, TrainRun]) -> dict[str, Any]:
    modes, errors = training_modes(profile, device, runs)
    for name, (_, step) in list(modes.items()):  # warm-up: allocator, cuDNN/cuBLAS plans, compilation
        try:
            time_steps(step, profile.warmup_steps, device)
            log(f"  warmed up: {name}")
        except Exception:  # one broken mode (out of memory, say) should not cost the others' rows
            errors[name] = traceback.format_exc()
            del modes[name]
            log(f"  FAILED: {name}\n{errors[name]}")
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for repeat in range(profile.repeats):  # modes take turns, rotating who goes first
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(time_steps(modes[name][1], profile.timed_steps, device))
    rows = []
    for name, (fields, _) in modes.items():
        median = statistics.median(seconds[name])
        rows.append(
            {
                **fields,
                "batch": profile.batch_size,
                "ms_per_step": 1000 * median,
                "images_per_s": profile.batch_size / median,
                "spread": [min(seconds[name]) / median, max(seconds[name]) / median],
            }
        )
        log(f"  {name}: {1000 * median:.1f} ms/step, {profile.batch_size / median:.0f} img/s")
    return {
        "image_size": image_size(profile),
        "dtype": str(profile.autocast_dtype).removeprefix("torch."),
        "timed_steps": profile.timed_steps,
        "repeats": profile.repeats,
        "rows": rows,
        "skipped_or_failed": errors,
    }


# ------------------------------------------------------------------------------------------- data feed


def write_jpegs(directory: Path, profile: Profile) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus sensor-like noise, quality 90) at ImageNet-like sizes.

    Pure noise would compress to several times a photo's size and decode slower; flat colour much faster.
    """
    rng = np.random.default_rng(0)
    paths = []
    for index in range(profile.jpeg_count):
        width, height = profile.jpeg_sizes[index % len(profile.jpeg_sizes)]
        coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0.0, 6.0, smooth.shape), 0, 255).astype(np.uint8)
        path = directory / f"{index:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
    return paths


class JpegFiles(Dataset):
    """`length` items cycling over the files: decode, then the training transform (as the Trainer's dataset)."""

    def __init__(
        self, paths: list[str], transform: Callable[[Image.Image], torch.Tensor], length: int
    ) -> None:
        self.paths, self.transform, self.length = paths, transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.paths[index % len(self.paths)], index)
        return self.transform(image), index % 1000


def feed_rate(
    paths: list[str], transform: Callable, workers: int, images: int, batch_size: int, device: torch.device
) -> float:
    """Images/s out of a DataLoader, onto the device, in steady state.

    The workers start together and the loader yields in order, so batches arrive in waves of `workers`. The
    first wave (worker start-up, and work done before any batch was taken) is not timed; the clock then runs
    over whole waves, from the last batch of one wave to the last batch of a later one.
    """
    wave = max(workers, 1)
    waves = max(1, -(-images // (wave * batch_size)))
    # Items for the untimed and timed waves, plus what the workers prefetch (2 batches each) meanwhile.
    length = batch_size * (wave * (waves + 1) + 2 * wave)
    loader = DataLoader(
        JpegFiles(paths, transform, length),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    iterator = iter(loader)
    start = 0.0
    for index, (pixels, _) in enumerate(iterator, start=1):
        pixels.to(device, non_blocking=True)
        if index == wave:
            synchronize(device)
            start = time.perf_counter()
        elif index == wave * (waves + 1):
            break
    synchronize(device)
    elapsed = time.perf_counter() - start
    del iterator  # shuts the workers down before the next setting starts its own
    return waves * wave * batch_size / elapsed


def milliseconds_per_image(paths: list[str], fn: Callable[[str], Any], count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        fn(paths[index % len(paths)])
    return 1000 * (time.perf_counter() - start) / count


def data_feed(profile: Profile, device: torch.device, training: dict[str, Any] | None) -> dict[str, Any]:
    config = DeiTDistillConfig.from_variant(
        "small", num_labels=profile.num_labels, **profile.student_overrides
    )
    transform = build_train_transform(build_image_processor(config), "deit")
    with tempfile.TemporaryDirectory(prefix="gpu_check_jpegs_") as directory:
        start = time.perf_counter()
        paths = write_jpegs(Path(directory), profile)
        mean_kib = statistics.mean(os.path.getsize(path) for path in paths) / 1024
        log(f"  {len(paths)} JPEGs written in {time.perf_counter() - start:.1f} s, mean {mean_kib:.0f} KiB")
        rows = []
        # In the main process with one thread: the per-core cost of decoding alone, of decoding and
        # augmenting, and of the whole loader path (with collation and the copy to the device).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            count = profile.feed_images_in_process // 2
            per_image_ms = {
                "decode": milliseconds_per_image(paths, decode_image, count),
                "decode + transform": milliseconds_per_image(
                    paths, lambda path: transform(decode_image(path)), count
                ),
            }
            rate = feed_rate(paths, transform, 0, profile.feed_images_in_process, profile.batch_size, device)
        finally:
            torch.set_num_threads(threads)
        log(f"  per image, 1 thread: {per_image_ms}")
        rows.append({"workers": 0, "images_per_s": rate, "ms_per_image_per_core": 1000 / rate})
        log(f"  in process, 1 thread: {rate:.0f} img/s")
        for workers in profile.feed_workers:
            rate = feed_rate(paths, transform, workers, profile.feed_images, profile.batch_size, device)
            rows.append(
                {"workers": workers, "images_per_s": rate, "ms_per_image_per_core": 1000 * workers / rate}
            )
            log(f"  {workers} workers: {rate:.0f} img/s")
    step_rates = [
        {
            "training": f"{row['model']}, {row['mode']}, {row['student']} student, teacher {row['teacher']}",
            "images_per_s": row["images_per_s"],
        }
        for row in (training or {}).get("rows", [])
        if row["mode"] != "teacher only"
    ]
    return {
        "jpegs": len(paths),
        "mean_jpeg_kib": mean_kib,
        "sizes": [list(size) for size in profile.jpeg_sizes],
        "batch_size": profile.batch_size,
        "output_size": image_size(profile),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "per_image_ms_one_thread": per_image_ms,
        "rows": rows,
        "step_rates": step_rates,
    }


# ------------------------------------------------------------------------------------------- inference


def inference(profile: Profile, device: torch.device, report: Report) -> None:
    section: dict[str, Any] = {"rows": [], "repeats": profile.inference_repeats}
    report.results["inference"] = section

    def calls_for_batch(batch: int) -> int:
        # About 0.2 s of forwards per repeat on an H100 at either end: 8 at batch 256, 64 at batch 1.
        return min(profile.inference_max_calls, -(-profile.inference_images_per_repeat // batch))

    for variant in profile.inference_variants:
        for row in benchmark_variant(
            variant, device, list(profile.inference_batch_sizes), profile.inference_repeats, calls_for_batch
        ):
            row["calls_per_repeat"] = calls_for_batch(row["batch"])
            section["rows"].append(row)
            report.save()
            log("  " + format_inference_row(row))
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- report

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


class Report:
    """results.json and results.md in `out`, rewritten whenever something new is known."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.results: dict[str, Any] = {"meta": meta, "errors": {}, "sections_done": []}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn()
            if result is not None:
                self.results[name] = result
            self.results["sections_done"].append(name)
        except Exception:
            self.results["errors"][name] = traceback.format_exc()
            log(f"{name} FAILED:\n{self.results['errors'][name]}")
        self.results["meta"].setdefault("section_seconds", {})[name] = time.perf_counter() - start
        self.save()

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = time.perf_counter() - START
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(render_markdown(self.results))


def render_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# gpu_check ({meta['profile']}): {meta['device_name']}",
        "",
        f"torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, timm {meta['timm']}, "
        f"Python {meta['python']}, {meta['cpu_count']} CPUs; {meta['elapsed_s']:.0f} s so far; "
        f"sections done: {', '.join(results['sections_done']) or 'none'}",
        "",
    ]
    correctness = results.get("correctness")
    if correctness:
        lines += [
            f"## Correctness: DeiT-S, {correctness['steps']} {correctness['dtype']} steps, batch {correctness['batch_size']}, "
            f"hard distillation from {correctness['teacher']} ({'PASSED' if correctness['passed'] else 'FAILED'})",
            "",
            "| run | first loss | last loss | seconds (compilation included) |",
            "|---|---:|---:|---:|",
        ]
        for name, values in correctness["losses"].items():
            lines.append(
                f"| {name} | {values[0]:.4f} | {values[-1]:.4f} | {correctness['seconds'][name]:.1f} |"
            )
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        for check in correctness["checks"]:
            lines.append(
                f"| {check['check']} | {'pass' if check['passed'] else 'FAIL'} | {check.get('detail', '')} |"
            )
        lines.append("")
    training = results.get("training")
    if training:
        lines += [
            f"## Training throughput at {training['image_size']} ({training['dtype']} autocast, fused AdamW, median of "
            f"{training['repeats']} x {training['timed_steps']} steps)",
            "",
            "| model | mode | student | teacher | batch | ms / step | images / s |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for row in training["rows"]:
            lines.append(
                f"| {row['model']} | {row['mode']} | {row['student']} | {row['teacher']} | {row['batch']} | "
                f"{row['ms_per_step']:.1f} | {row['images_per_s']:.0f} |"
            )
        for name, error in training["skipped_or_failed"].items():
            lines.append(f"\n- {name}: {error.strip().splitlines()[-1]}")
        lines.append("")
    feed = results.get("data_feed")
    if feed:
        lines += [
            f"## Data feed: DeiT train transform at {feed['output_size']}, {feed['jpegs']} JPEGs "
            f"(mean {feed['mean_jpeg_kib']:.0f} KiB), batch {feed['batch_size']}, {feed['usable_cpus']} CPUs",
            "",
            "| DataLoader workers | images / s | ms per image per core |",
            "|---:|---:|---:|",
        ]
        for row in feed["rows"]:
            workers = "0 (in process, 1 thread)" if row["workers"] == 0 else row["workers"]
            lines.append(f"| {workers} | {row['images_per_s']:.0f} | {row['ms_per_image_per_core']:.2f} |")
        split = feed["per_image_ms_one_thread"]
        lines.append(
            f"\nOne thread, per image: decode {split['decode']:.2f} ms, decode + transform "
            f"{split['decode + transform']:.2f} ms."
        )
        worker_rows = [row for row in feed["rows"] if row["workers"] > 0]
        if feed["step_rates"] and worker_rows:
            header = " | ".join(f"feed / step, {row['workers']} workers" for row in worker_rows)
            lines += [
                "",
                f"| training step | images / s | {header} |",
                "|---|---:|" + "---:|" * len(worker_rows),
            ]
            for step in feed["step_rates"]:
                ratios = " | ".join(
                    f"{row['images_per_s'] / step['images_per_s']:.2f}x" for row in worker_rows
                )
                lines.append(f"| {step['training']} | {step['images_per_s']:.0f} | {ratios} |")
        lines.append("")
    inference_section = results.get("inference")
    if inference_section and inference_section["rows"]:
        lines += [
            f"## Inference (bench/inference.py, median of {inference_section['repeats']} repeats)",
            "",
            INFERENCE_TABLE_HEADER,
            *(format_inference_row(row) for row in inference_section["rows"]),
            "",
        ]
    if results.get("launchers"):
        from gpu_launchers import render

        lines += render(results["launchers"])
    if results.get("device_feed"):
        from gpu_device_feed import render as render_device_feed

        lines += [*render_device_feed(results["device_feed"]), ""]
    for name, error in results["errors"].items():
        lines += [f"## {name} FAILED", "", "```", error.strip(), "```", ""]
    return "\n".join(lines)


def environment(profile: Profile, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "profile": profile.name,
        "profile_settings": asdict(profile),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="Folder for results.json and results.md.")
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes on the CPU: checks the script works."
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["correctness", "training", "data_feed", "inference"],
        choices=["correctness", "training", "data_feed", "inference", "launchers", "device_feed"],
        help="Sections to run. `launchers` (bench/gpu_launchers.py: FSDP2 and DeepSpeed ZeRO-2 runs of deit-distill "
        "train with a live teacher and from a cache, killed and resumed, against DDP) is asked for by name.",
    )
    parser.add_argument(
        "--launchers",
        nargs="+",
        default=None,
        choices=["ddp", "fsdp2", "deepspeed_zero2"],
        help="For `launchers`: which launchers run their kill-and-resume rows, in this order (default: all).",
    )
    parser.add_argument(
        "--launcher_timeout",
        type=float,
        default=600,
        help="For `launchers`: seconds each `accelerate launch` may take before it is killed and counted failed.",
    )
    parser.add_argument(
        "--feed_size",
        choices=["full", "short"],
        default="full",
        help="For `device_feed`: `full` (4096 JPEGs, 60 steps) or `short` (1024 JPEGs, 36 steps), to fit a short lease.",
    )
    args = parser.parse_args()
    profile = SMOKE if args.smoke else GPU
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # the tests share small machines; spinning OpenMP threads only lose there
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device; use --smoke to exercise the script on the CPU")
    transformers.logging.set_verbosity_error()

    report = Report(args.out, environment(profile, device))
    log(json.dumps({k: v for k, v in report.results["meta"].items() if k != "profile_settings"}))
    runs: dict[str, TrainRun] = {}
    if "correctness" in args.sections:
        report.section("correctness", lambda: check_correctness(profile, device, runs))
    if "training" in args.sections:
        report.section("training", lambda: training_throughput(profile, device, runs))
    runs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "data_feed" in args.sections:
        report.section("data_feed", lambda: data_feed(profile, device, report.results.get("training")))
    if "inference" in args.sections:
        report.section("inference", lambda: inference(profile, device, report))
    if "launchers" in args.sections:
        from gpu_launchers import launchers_section

        report.section(
            "launchers", lambda: launchers_section(device, args.out, args.launchers, args.launcher_timeout)
        )
    if "device_feed" in args.sections:
        from gpu_device_feed import device_feed_section

        training = report.results.get("training")
        report.section(
            "device_feed",
            lambda: device_feed_section(device, args.out, args.smoke, training, args.feed_size),
        )
    print("\n" + render_markdown(report.results), flush=True)
    correctness = report.results.get("correctness", {"passed": "correctness" not in args.sections})
    launched = report.results.get("launchers", {"passed": True})
    sys.exit(0 if correctness["passed"] and launched["passed"] and not report.results["errors"] else 1)


if __name__ == "__main__":
    main()
