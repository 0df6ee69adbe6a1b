"""The one place that turns the student's image processor into train and eval transforms.

Everything is read from the image processor saved with the checkpoint (`crop_size`, `size`, `resample`,
`image_mean`, `image_std`), so training, evaluation and inference after `from_pretrained` see the same
resolution and normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, posterize
from transformers.image_processing_utils import BaseImageProcessor

from .data import decode_image
from .device_augment import DecodeForDevice, DeviceAugmentSpec, device_augment_spec

TRAIN_PRESETS = ("deit", "light", "none")
ImageTransform = Callable[[Image.Image], torch.Tensor]


def build_train_transform(image_processor: BaseImageProcessor, preset: str = "deit") -> ImageTransform:
    """Training transform for one RGB PIL image, returning a normalised `(3, H, W)` float tensor.

    Args:
        image_processor: The student's image processor; the output has its crop size (its size without
            centre crop) and is normalised with its mean and std.
        preset: "deit", the paper's recipe: RandomResizedCrop (scale 0.08-1, the processor's resampling,
            bicubic for DeiT), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1` and random erasing
            (p 0.25, per-pixel noise). "light", for small or low-resolution data such as 28x28 Fashion-MNIST,
            where RandAugment and erasing destroy too much of the image: RandomResizedCrop with scale 0.8-1
            and horizontal flip. "none": the eval transform.
    """
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"preset must be one of {TRAIN_PRESETS}, got {preset!r}.")
    if preset == "none":
        return build_eval_transform(image_processor)
    common = {
        "input_size": (3, *output_size(image_processor)),
        "is_training": True,
        "interpolation": _interpolation_name(image_processor),
        **_normalisation_kwargs(image_processor),
    }
    if preset == "light":
        return create_transform(**common, scale=(0.8, 1.0), color_jitter=None)
    # color_jitter 0.3 as in the official recipe; timm disables it when RandAugment is on, as DeiT did.
    transform = create_transform(
        **common,
        color_jitter=0.3,
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    )
    # Pillow 13 rejects what timm's posterize asks for at full magnitude; see `_posterize_keeping_zero_bits`.
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize_keeping_zero_bits
    return transform


def build_train_views(
    image_processor: BaseImageProcessor, preset: str = "deit", augment_on: str = "workers"
) -> ImageTransform | DecodeForDevice:
    """The worker-side transform of a train preset: all of it (`workers`), or only the decode and the draw of each
    view's parameters (`device`, with "deit" or "light"; `device_augment` applies them to the batch)."""
    if augment_on == "workers" or preset == "none":
        return build_train_transform(image_processor, preset)
    return DecodeForDevice(device_augment_spec_of(image_processor, preset))


def device_augment_spec_of(image_processor: BaseImageProcessor, preset: str) -> DeviceAugmentSpec:
    """The device path's spec of a train preset, read from the processor as `build_train_transform` reads it."""
    mean, std = normalisation(image_processor)
    interpolation = _interpolation_name(image_processor)
    return device_augment_spec(output_size(image_processor), mean, std, preset, interpolation)


def build_eval_transform(image_processor: BaseImageProcessor) -> ImageTransform:
    """Eval transform for one RGB PIL image: exactly `image_processor(image)["pixel_values"][0]`."""
    return _ProcessorTransform(image_processor)


def output_size(image_processor: BaseImageProcessor) -> tuple[int, int]:
    """`(height, width)` of the processor's output: its crop size, or its size when it does not crop.

    A `shortest_edge` size without centre crop has no fixed output shape; training uses a square of that edge.
    timm's processor (`TimmWrapperImageProcessor`) keeps its settings in `data_config`.
    """
    data_config = getattr(image_processor, "data_config", None)
    if data_config:
        return tuple(data_config["input_size"][-2:])
    cropped = getattr(image_processor, "do_center_crop", False)
    size = dict(image_processor.crop_size if cropped else image_processor.size)
    if size.get("height") is not None and size.get("width") is not None:
        return size["height"], size["width"]
    edge = size.get("shortest_edge") or size.get("longest_edge")
    if edge is not None:
        return edge, edge
    raise ValueError(f"Cannot tell the output size of the image processor from {size}.")


def with_image_transform(dataset: datasets.Dataset, image_transform: ImageTransform) -> ImageExamples:
    """`dataset` yielding `{"pixel_values": (3, H, W) tensor, "labels": int}`, transformed on access."""
    return ImageExamples(dataset, image_transform)


class ImageExamples(torch.utils.data.Dataset):
    """A dataset of `{"image", "label"}` rows served as `{"pixel_values", "labels"}` examples.

    Rows are read in batches (`__getitems__`, one Arrow read per batch: per-row reads of a `datasets.Dataset`
    cost about 250 us each) and transformed one by one, so that `SeededViews` can seed each example's
    augmentation. Images are read undecoded and go through `decode_image` (every mode becomes RGB), so a corrupt
    image raises a `CorruptImageError` naming its index and file rather than a bare PIL error.
    """

    def __init__(self, dataset: datasets.Dataset, image_transform: ImageTransform) -> None:
        self.rows = dataset.select_columns(["image", "label"]).cast_column(
            "image", datasets.Image(decode=False)
        )
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: list[int]) -> list[tuple[int, Any, int]]:
        """The undecoded rows at `indices`, as `(index, image, label)`."""
        batch = self.rows[indices]
        return list(zip(indices, batch["image"], batch["label"], strict=True))

    def transform(self, row: tuple[int, Any, int]) -> dict[str, Any]:
        """One read row as a model input."""
        index, image, label = row
        if getattr(self.image_transform, "takes_undecoded", False):
            # `--augment_on device`: the transform decodes itself (reduced JPEG decoding) and returns a dict.
            return {**self.image_transform(image, index), "labels": label}
        return {"pixel_values": self.image_transform(decode_image(image, index)), "labels": label}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.read([index])[0])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.transform(row) for row in self.read(indices)]


class _ProcessorTransform:
    def __init__(self, image_processor: BaseImageProcessor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _posterize_keeping_zero_bits(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    # timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (m9 + mstd noise reaches it for ~0.1% of images);
    # Pillow 13 rejects 0 bits where older Pillow returned a black image, so do what older Pillow did.
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def normalisation(image_processor: BaseImageProcessor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(mean, std)` the processor normalises with (a transformers or timm-wrapper processor)."""
    data_config = getattr(image_processor, "data_config", None)
    if data_config:
        return tuple(data_config["mean"]), tuple(data_config["std"])
    # A processor that does not normalise still rescales to [0, 1]; mean 0 and std 1 do the same.
    if not image_processor.do_normalize:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(image_processor.image_mean), tuple(image_processor.image_std)


def _interpolation_name(image_processor: BaseImageProcessor) -> str:
    """timm's name for the processor's resampling: a PIL code (3 -> "bicubic") or a torchvision mode."""
    data_config = getattr(image_processor, "data_config", None)
    if data_config:
        return data_config.get("interpolation", "bicubic")
    resample = image_processor.resample
    if hasattr(resample, "value") and isinstance(resample.value, str):
        return resample.value
    return Image.Resampling(int(resample)).name.lower()


def _normalisation_kwargs(image_processor: BaseImageProcessor) -> dict[str, tuple[float, ...]]:
    mean, std = normalisation(image_processor)
    return {"mean": mean, "std": std}
