"""The DeiT preprocessing saved next to every checkpoint, as transformers' own `DeiTImageProcessor`.

Using the native processor class keeps `preprocessor_config.json` loadable without remote code.
"""

from __future__ import annotations

from transformers import DeiTImageProcessor, PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .configuration_deit_distill import _as_pair


def build_image_processor(
    config: PretrainedConfig,
    crop_pct: float = 0.875,
    image_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    image_std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> DeiTImageProcessor:
    """Resize to `image_size / crop_pct` and centre-crop `image_size` (the paper's eval: 256 -> 224), bicubic.

    `crop_pct=1.0` resizes straight to the model's resolution, which suits small images such as 28x28.
    `config` is any config with `image_size` (and `num_channels`, default 3), e.g. a convnet teacher's.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    num_channels = getattr(config, "num_channels", 3)
    if len(image_mean) != num_channels or len(image_std) != num_channels:
        raise ValueError(
            f"image_mean/image_std need {num_channels} values (num_channels), got "
            f"{len(image_mean)} and {len(image_std)}."
        )
    height, width = _as_pair(config.image_size)
    # size and crop_size are both set: the PIL and torchvision backends disagree on defaults otherwise.
    return DeiTImageProcessor(
        size={"height": int(height / crop_pct), "width": int(width / crop_pct)},
        crop_size={"height": height, "width": width},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
