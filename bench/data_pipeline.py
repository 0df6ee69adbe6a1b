"""What deterministic views cost: one epoch of the demo's training data, before and after, interleaved.

    python bench/data_pipeline.py --rounds 5

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
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deit_distill.modeling_deit_distill import DeiTDistillConfig, build_image_processor
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.data import decode_image, load_image_dataset
from deit_distill.training.sampler import ViewSampler
from deit_distill.training.transforms import build_train_transform, with_image_transform
from deit_distill.training.views import SeededViews, ViewCollator

BATCH, NUM_CLASSES = 128, 10


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max_train_samples", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
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
