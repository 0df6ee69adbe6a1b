"""The `device_feed` section of bench/gpu_check.py (issue 19): `deit-distill train` end to end, `--augment_on device`
against `workers`, from a teacher cache and with a live teacher.

    python bench/gpu_check.py --sections device_feed --out gpu_results        # on a CUDA machine
    python bench/gpu_check.py --smoke --sections device_feed --out /tmp/smoke # tiny sizes on the CPU (plumbing)

A folder of photo-like JPEGs at ImageNet's shapes (`data_pipeline.photo_jpegs`) is an image-folder dataset; the
teacher is a RegNetY-16GF-sized transformers RegNet with random weights (saved locally, so nothing is downloaded);
the student is DeiT-S at 224, compiled, bf16, batch 256, `FEED_WORKERS` data-loader workers. For each path
(`workers`, `device`) a teacher cache is written once by `cache-teacher` (the cache records the path, so each
path has its own), then `train` runs from it and with the live teacher. Images/s are read from the run itself: the
trainer's `training_step` is timed (synchronised) after `WARMUP_STEPS`, so compilation is not counted. The GPU
time of `augment_batch` on one collated batch is timed with CUDA events and set against a step (its share).
The ratios the issue asks for are computed against the `training` section's math-only rates when it ran first.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FEED_WORKERS = 8


@dataclass(frozen=True)
class FeedProfile:
    images: int
    classes: int
    image_size: int
    student: list[str]
    batch_size: int
    steps: int
    warmup_steps: int
    workers: int
    precision: list[str]
    compile: bool


GPU_FEED = FeedProfile(
    images=4096,
    classes=100,
    image_size=224,
    student=["--variant", "small"],
    batch_size=256,
    steps=60,
    warmup_steps=20,
    workers=FEED_WORKERS,
    precision=["--bf16", "true"],
    compile=True,
)
# `--feed_size short`: the same runs on fewer distinct JPEGs (writing them is single-threaded, about 15-30 ms each)
# and fewer steps, so that the section fits a short GPU lease next to others (bench/gpu_run.sh); still 256-image
# batches, compiled, with as many timed steps after warm-up as the rate needs to settle.
SHORT_FEED = dataclasses.replace(GPU_FEED, images=1024, steps=36, warmup_steps=12)
FEED_PROFILES = {"full": GPU_FEED, "short": SHORT_FEED}
SMOKE_FEED = FeedProfile(
    images=48,
    classes=4,
    image_size=32,
    student=["--config_overrides", "patch_size=8,hidden_size=48,num_hidden_layers=2,num_attention_heads=3"],
    batch_size=8,
    steps=4,
    warmup_steps=1,
    workers=2,
    precision=["--use_cpu", "true"],
    compile=False,
)


def write_image_folder(root: Path, profile: FeedProfile) -> Path:
    """`root/train/class_k/i.jpg`: photo-like JPEGs at ImageNet's shapes, classes in turn."""
    from data_pipeline import photo_jpegs

    shapes = ((500, 375), (500, 333), (375, 500), (500, 400))
    per_shape = -(-profile.images // len(shapes))
    # One process per shape: drawing and encoding a JPEG takes 15-30 ms, seconds per thousand on one core.
    with ProcessPoolExecutor(len(shapes)) as pool:
        batches = pool.map(photo_jpegs, [per_shape] * len(shapes), shapes, [root / "sources"] * len(shapes))
        jpegs = [data for batch in batches for data in batch][: profile.images]
    for index, data in enumerate(jpegs):
        folder = root / "train" / f"class_{index % profile.classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").write_bytes(data)
    return root / "train"


def save_teacher(path: Path, profile: FeedProfile, num_labels: int, smoke: bool) -> None:
    """A RegNetY-16GF-shaped transformers RegNet (random weights) with a 224 image processor; tiny for the smoke."""
    from transformers import RegNetConfig, RegNetForImageClassification

    from deit_distill.modeling_deit_distill import build_image_processor

    torch.manual_seed(0)
    labels = {i: f"class_{i:03d}" for i in range(num_labels)}
    shape = (
        {"depths": [1, 1], "hidden_sizes": [16, 32], "groups_width": 8, "embedding_size": 16}
        if smoke
        else {"depths": [2, 4, 11, 1], "hidden_sizes": [224, 448, 1232, 3024], "groups_width": 112}
    )
    config = RegNetConfig(
        **shape,
        layer_type="y",
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    config.image_size = profile.image_size
    RegNetForImageClassification(config).save_pretrained(path)
    build_image_processor(config, crop_pct=1.0 if smoke else 0.875).save_pretrained(path)


def train_argv(profile: FeedProfile, data: Path, output: Path, augment_on: str) -> list[str]:
    return [
        *profile.student,
        "--dataset_name", str(data),
        "--max_eval_samples", "64",
        "--image_size", str(profile.image_size),
        "--augmentation", "deit", "--mixup", "0.8", "--cutmix", "1.0",
        "--augment_on", augment_on,
        "--distillation_type", "hard",
        "--per_device_train_batch_size", str(profile.batch_size),
        "--per_device_eval_batch_size", "64",
        "--dataloader_num_workers", str(profile.workers),
        "--dataloader_drop_last", "true",
        "--max_steps", str(profile.steps),
        "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", str(profile.steps),
        "--learning_rate", "0.0005", "--seed", "0",
        "--report_to", "none", "--disable_tqdm", "true",
        "--output_dir", str(output), "--overwrite_output_dir", "true",
        *(["--torch_compile", "true"] if profile.compile else []),
        *profile.precision,
    ]  # fmt: skip


class StepClock:
    """Wraps `DistillationTrainer.training_step` to record a synchronised timestamp at each step's start."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __enter__(self) -> StepClock:
        from deit_distill.training.trainer import DistillationTrainer

        self.original = DistillationTrainer.training_step
        clock = self

        def timed_step(trainer, *args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock.stamps.append(time.perf_counter())
            return clock.original(trainer, *args, **kwargs)

        DistillationTrainer.training_step = timed_step
        return self

    def __exit__(self, *exc: Any) -> None:
        from deit_distill.training.trainer import DistillationTrainer

        DistillationTrainer.training_step = self.original

    def images_per_s(self, batch_size: int, warmup_steps: int) -> float:
        stamps = self.stamps[warmup_steps:]
        return batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def augment_share(profile: FeedProfile, data: Path, device: torch.device, step_ms: float) -> dict[str, float]:
    """GPU milliseconds of `augment_batch` on one collated batch (CUDA events; wall time on the CPU)."""
    import datasets

    from deit_distill.modeling_deit_distill import DeiTDistillConfig, build_image_processor
    from deit_distill.training.collator import DistillationCollator
    from deit_distill.training.device_augment import augment_batch
    from deit_distill.training.transforms import (
        build_train_views,
        device_augment_spec_of,
        with_image_transform,
    )
    from deit_distill.training.views import AUGMENT_PARAMS, SeededViews, ViewKey

    processor = build_image_processor(DeiTDistillConfig(image_size=profile.image_size))
    rows = datasets.load_dataset("imagefolder", data_dir=str(data), split="train")
    views = SeededViews(with_image_transform(rows, build_train_views(processor, "deit", "device")))
    keys = [
        ViewKey(0, 0, 0, index % len(rows), index // len(rows), index) for index in range(profile.batch_size)
    ]
    examples = [{k: v for k, v in e.items() if k != "view"} for e in views.__getitems__(keys)]
    spec = device_augment_spec_of(processor, "deit")
    batch = DistillationCollator(10, mixup_alpha=0.8, cutmix_alpha=1.0, device_augment=spec)(
        examples, views=keys
    )
    images = batch["pixel_values"].to(device)
    timings = []
    for _ in range(6):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            augment_batch(images, batch[AUGMENT_PARAMS])
            end.record()
            torch.cuda.synchronize()
            timings.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            augment_batch(images, batch[AUGMENT_PARAMS])
            timings.append(1000 * (time.perf_counter() - began))
    augment_ms = sorted(timings[1:])[len(timings[1:]) // 2]
    return {
        "augment_ms_per_batch": augment_ms,
        "step_ms": step_ms,
        "augment_share_of_step": augment_ms / step_ms,
    }


def device_feed_section(
    device: torch.device,
    out: Path,
    smoke: bool,
    training: dict[str, Any] | None = None,
    size: str = "full",
) -> dict[str, Any]:
    from deit_distill.training.commands.cache_teacher import run_cache_teacher
    from deit_distill.training.commands.train import parse_args, run_training

    profile = SMOKE_FEED if smoke else FEED_PROFILES[size]
    work = out / "device_feed"
    data = write_image_folder(work / "jpegs", profile)
    teacher = work / "teacher"
    save_teacher(teacher, profile, profile.classes, smoke)
    rows = []
    for augment_on in ("workers", "device"):
        cache = work / f"cache_{augment_on}"
        argv = [
            *train_argv(profile, data, work / f"cache_run_{augment_on}", augment_on),
            "--teacher",
            str(teacher),
        ]
        run_cache_teacher(*parse_args([*argv, "--teacher_cache", str(cache)], command="cache-teacher"))
        for mode, extra in (
            ("teacher cache", ["--teacher_cache", str(cache)]),
            ("live teacher", ["--teacher", str(teacher)]),
        ):
            run_dir = work / f"{augment_on}_{mode.replace(' ', '_')}"
            with StepClock() as clock:
                run_training(*parse_args([*train_argv(profile, data, run_dir, augment_on), *extra]))
            rate = clock.images_per_s(profile.batch_size, profile.warmup_steps)
            rows.append(
                {"augment_on": augment_on, "mode": mode, "images_per_s": rate, "steps": len(clock.stamps)}
            )
    device_cache = next(r for r in rows if r["augment_on"] == "device" and r["mode"] == "teacher cache")
    share = augment_share(profile, data, device, 1000 * profile.batch_size / device_cache["images_per_s"])
    ratios = {}
    for row in (training or {}).get("rows", []):
        if row.get("model") == "DeiT-S" and row.get("student") == "compiled":
            key = {"student only": "teacher cache", "live teacher": "live teacher"}.get(row["mode"])
            if key:
                for ours in rows:
                    if ours["mode"] == key:
                        ratios[f"{ours['augment_on']}, {key} / math-only {row['mode']}"] = (
                            ours["images_per_s"] / row["images_per_s"]
                        )
    return {
        "rows": rows,
        "augment": share,
        "ratios_to_math_only": ratios,
        "workers": profile.workers,
        "profile": {"images": profile.images, "steps": profile.steps, "warmup_steps": profile.warmup_steps},
    }


def render(section: dict[str, Any]) -> list[str]:
    lines = [
        "## Device feed (`deit-distill train`, --augment_on)",
        "",
        f"{section['workers']} data-loader workers; images/s from the run's own steps after warm-up"
        + (
            f" ({section['profile']['steps']} steps, {section['profile']['warmup_steps']} of warm-up, "
            f"{section['profile']['images']} distinct JPEGs)."
            if "profile" in section
            else "."
        ),
        "",
        "| augment_on | mode | images/s |",
        "|---|---|---:|",
    ]
    lines += [f"| {r['augment_on']} | {r['mode']} | {r['images_per_s']:,.0f} |" for r in section["rows"]]
    augment = section["augment"]
    lines += [
        "",
        f"augment_batch: {augment['augment_ms_per_batch']:.2f} ms per batch, "
        f"{100 * augment['augment_share_of_step']:.1f}% of a step ({augment['step_ms']:.1f} ms).",
    ]
    lines += [f"- {name}: {value:.2f}x" for name, value in section["ratios_to_math_only"].items()]
    return lines
