"""What the data feed costs: deterministic views (`--part views`) and the device augmentation (`--part feed`).

    python bench/data_pipeline.py --rounds 5
    python bench/data_pipeline.py --part feed --rounds 3

`--part feed` (issue 19): CPU milliseconds per training image of the whole feed at 224 px, on synthetic
photo-like 500x375 JPEGs (ImageNet's typical shape, written under /tmp), the DeiT recipe with Mixup/CutMix,
batch 64, 0 workers, one thread, side by side: `workers` (decode + timm's PIL transform + collate) against
`device` (decode + parameter draw + uint8 collate in the worker; then `augment_batch` on CPU tensors, timed
apart, which a GPU runs instead), and `device` without JPEG's reduced decoding.

"before" is the pipeline as it was: a `datasets.Dataset` with the transform set by `with_transform` (read and
transformed a batch at a time), a plain shuffling sampler, timm's `Mixup` drawing from NumPy's global state. "after" is what `DistillationTrainer` builds now: `SeededViews` (the global
generators seeded from each view's key and restored), `ViewSampler` and the key-driven `DistillationCollator`.
Both run the demo's recipe (2,000 Fashion-MNIST images at 28 px, the DeiT augmentation, Mixup 0.8 / CutMix 1.0,
batch 128) with 0 workers, one thread; the two take turns each round and the median round is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deit_distill.modeling_deit_distill import DeiTDistillConfig, build_image_processor
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.data import decode_image, load_image_dataset
from deit_distill.training.device_augment import DecodeForDevice, DeviceAugmentSpec, augment_batch
from deit_distill.training.sampler import ViewSampler
from deit_distill.training.transforms import (
    build_train_transform,
    device_augment_spec_of,
    with_image_transform,
)
from deit_distill.training.views import AUGMENT_PARAMS, SeededViews, ViewCollator

BATCH, NUM_CLASSES = 128, 10
FEED_BATCH = 64


class BatchTransform:
    """The former `with_transform` function: decode and transform a batch of rows."""

    def __init__(self, image_transform) -> None:
        self.image_transform = image_transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [self.image_transform(decode_image(value)) for value in batch["image"]]
        return {"pixel_values": images, "labels": list(batch["label"])}


class GlobalStateMixup:
    """The former collator: stack, then timm's Mixup (flip pairing, NumPy global state) on even batches."""

    def __init__(self) -> None:
        self.mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.as_tensor([example["labels"] for example in examples])
        even = len(examples) - len(examples) % 2
        targets = self.mixup(pixel_values[:even], labels[:even])[1]
        return {"pixel_values": pixel_values, "labels": targets}


def loaders(max_train_samples: int) -> dict[str, DataLoader]:
    dataset = load_image_dataset("fashion_mnist", train_subset=max_train_samples, seed=0)["train"]
    config = DeiTDistillConfig(image_size=28, patch_size=7, num_labels=NUM_CLASSES)
    processor = build_image_processor(config, crop_pct=1.0, image_mean=(0.286,) * 3, image_std=(0.353,) * 3)
    transform = build_train_transform(processor, "deit")
    before = dataset.cast_column("image", datasets.Image(decode=False)).with_transform(
        BatchTransform(transform)
    )
    views = SeededViews(with_image_transform(dataset, transform))
    collator = DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    return {
        "before": DataLoader(
            before, batch_size=BATCH, sampler=RandomSampler(before), collate_fn=GlobalStateMixup()
        ),
        "after": DataLoader(
            views,
            batch_size=BATCH,
            sampler=ViewSampler(views, global_batch_size=BATCH, seed=0),
            collate_fn=ViewCollator(collator),
        ),
    }


def photo_jpegs(count: int, size: tuple[int, int], folder: Path) -> list[bytes]:
    """`count` photo-like JPEGs (smooth structure, edges, sensor noise; quality 90), cached under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        path = folder / f"{size[0]}x{size[1]}_{index}.jpg"
        if not path.exists():
            rng = np.random.default_rng(index)
            y, x = np.mgrid[0 : size[1], 0 : size[0]]
            phase, period = rng.uniform(0, 6, 3), rng.uniform(8, 60, 3)
            image = np.stack(
                [128 + 100 * np.sin(x / period[c] + phase[c]) * np.cos(y / period[2 - c]) for c in range(3)],
                -1,
            )
            image += rng.normal(0, 8, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        images.append(path.read_bytes())
    return images


def feed_loaders(count: int, size: tuple[int, int]) -> tuple[dict[str, DataLoader], DeviceAugmentSpec]:
    jpegs = photo_jpegs(count, size, Path("/tmp/deit_distill_bench_jpegs"))
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data in jpegs],
            "label": [i % NUM_CLASSES for i in range(count)],
        },
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    processor = build_image_processor(DeiTDistillConfig(image_size=224, num_labels=NUM_CLASSES))
    spec = device_augment_spec_of(processor, "deit")
    mixing = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    transforms = {
        "workers": (build_train_transform(processor, "deit"), None),
        "device": (DecodeForDevice(spec), spec),
        "device, no reduced decoding": (DecodeForDevice(spec, reduced_decoding=False), spec),
    }
    loaders = {}
    for name, (transform, device_spec) in transforms.items():
        views = SeededViews(with_image_transform(dataset, transform))
        collator = DistillationCollator(NUM_CLASSES, **mixing, device_augment=device_spec)
        loaders[name] = DataLoader(
            views,
            batch_size=FEED_BATCH,
            sampler=ViewSampler(views, global_batch_size=FEED_BATCH, seed=0),
            collate_fn=ViewCollator(collator),
        )
    return loaders, spec


def feed(rounds: int, count: int, size: tuple[int, int]) -> None:
    """CPU ms per image of each feed; the device augmentation on CPU tensors timed apart."""
    loaders, _ = feed_loaders(count, size)
    seconds: dict[str, list[float]] = {name: [] for name in [*loaders, "augment_batch on CPU tensors"]}
    for round_index in range(rounds + 1):  # round 0 warms up
        names = list(loaders) if round_index % 2 == 0 else list(reversed(loaders))
        for name in names:
            batches, start = [], time.process_time()
            for batch in loaders[name]:
                batches.append(batch)
            elapsed = time.process_time() - start
            if round_index:
                seconds[name].append(elapsed)
            if name == "device" and round_index:
                start = time.process_time()
                for batch in batches:
                    augment_batch(batch["pixel_values"], batch[AUGMENT_PARAMS])
                seconds["augment_batch on CPU tensors"].append(time.process_time() - start)
    ms = {name: 1000 * statistics.median(values) / count for name, values in seconds.items()}
    print(
        f"{count} images {size[0]}x{size[1]} JPEG -> 224, batch {FEED_BATCH}, 0 workers, 1 thread, CPU ms / image, "
        f"median of {rounds} rounds"
    )
    print("| feed | CPU ms / image |")
    print("|---|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.3f} |")
    print(f"device host feed / workers feed: {ms['device'] / ms['workers']:.3f}")
    total = ms["device"] + ms["augment_batch on CPU tensors"]
    print(
        f"device feed + augment on CPU tensors: {total:.3f} ms / image, {total / ms['workers']:.3f}x workers"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("views", "feed"), default="views")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--feed_images", type=int, default=256)
    parser.add_argument("--feed_size", default="500x375", help="JPEG width x height for --part feed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "feed":
        feed(args.rounds, args.feed_images, tuple(int(v) for v in args.feed_size.split("x")))
        return
    pipelines = loaders(args.max_train_samples)
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for round_index in range(args.rounds + 1):  # round 0 warms up (file cache, lazy imports)
        names = list(pipelines) if round_index % 2 == 0 else list(reversed(pipelines))
        for name in names:
            start = time.process_time()
            for _ in pipelines[name]:
                pass
            if round_index:
                seconds[name].append(time.process_time() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"one epoch of {args.max_train_samples} images, CPU seconds, median of {args.rounds} rounds")
    print("| pipeline | s / epoch | ms / image |")
    print("|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {1000 * value / args.max_train_samples:.3f} |")
    print(f"after / before: {medians['after'] / medians['before']:.3f}")


if __name__ == "__main__":
    main()
