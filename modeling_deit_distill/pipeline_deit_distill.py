"""The image-classification pipeline saved with every model, so inference decodes images exactly as training.

transformers' own pipeline opens images with `load_image`, which calls PIL's `convert("RGB")`: 16-bit greyscale
saturates to white and transparent pixels show whatever colour lies under them. Training decodes with `to_rgb`
below instead; `DeiTDistillImageClassificationPipeline` applies the same function before the image processor, and
`attach_pipeline` makes a saved model directory (this project's model or any transformers image classifier)
load that pipeline through `pipeline("image-classification", model=DIR, trust_remote_code=True)`.

This file is copied next to the weights and runs as remote code: it imports only the standard library, PIL,
numpy, torch and transformers, and no sibling module, so it also works beside models that ship no code of ours.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers import ImageClassificationPipeline

PIPELINE_TASK = "image-classification"
# 16-bit and 32-bit greyscale modes, rescaled to 8 bits by `to_rgb` rather than clipped.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to an upright RGB image: the one conversion used by training, eval and the pipeline.

    The EXIF orientation is applied (as cameras expect, and as `datasets` and transformers' `load_image` do).
    Transparent images (RGBA, LA, palette or greyscale with a transparent colour) are composited on white,
    because transparent areas are background and dropping alpha would expose arbitrary (often black) colour.
    16-bit greyscale is rescaled by its nominal range (65535 -> 255); 32-bit integer is taken as 16-bit when
    its values exceed 255; float is taken as [0, 1] when its values stay within it. PIL's own conversion
    would clip such images to near-white. Everything else (L, 1, CMYK, YCbCr, ...) uses PIL's conversion.
    """
    # Checked first because `exif_transpose` copies the image even when there is nothing to do.
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and not image.has_transparency_data:
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _to_8_bit_greyscale(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: str | Image.Image, timeout: float | None = None) -> Image.Image:
    """The image the pipeline was given, opened but not converted (`to_rgb` does that).

    Accepts what transformers' `load_image` accepts: a PIL image, a local path, an http(s) URL, or base64
    (optionally as a `data:image/...` URI).
    """
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, str):
        raise TypeError(f"Expected a PIL image, a path, a URL or base64 data, got {type(source).__name__}.")
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            return Image.open(io.BytesIO(response.read()))
    if os.path.isfile(source):
        return Image.open(source)
    encoded = source.split(",", 1)[1] if source.startswith("data:image/") else source
    try:
        return Image.open(io.BytesIO(base64.b64decode(encoded)))
    except (binascii.Error, OSError) as error:
        raise ValueError(
            f"Not an existing file, an http(s) URL or base64 image data: {source[:80]!r} ({error})."
        ) from error


class DeiTDistillImageClassificationPipeline(ImageClassificationPipeline):
    """transformers' image-classification pipeline, with images converted by `to_rgb` as in training."""

    def preprocess(self, image: Any, timeout: float | None = None) -> Any:
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            image = to_rgb(open_image(image, timeout))
        # The parent's `load_image` leaves an upright RGB image unchanged.
        return super().preprocess(image, timeout=timeout)


def attach_pipeline(save_directory: str | os.PathLike) -> None:
    """Make a saved model directory load `DeiTDistillImageClassificationPipeline` as its image-classification
    pipeline: copies this file there and names the class in `config.json`'s `custom_pipelines`.

    Works for this project's models and for any transformers image classifier (e.g. a ResNet teacher). The
    directory then needs `trust_remote_code=True` for `pipeline(...)`, so do not attach it to copies meant to
    load without remote code.
    """
    directory = Path(save_directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved model: it has no config.json.")
    source = Path(__file__)
    shutil.copyfile(source, directory / source.name)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["custom_pipelines"] = {
        **(config.get("custom_pipelines") or {}),
        PIPELINE_TASK: {
            "impl": f"{source.stem}.{DeiTDistillImageClassificationPipeline.__name__}",
            # Names of transformers classes, resolved by `pipeline()` to load the model.
            "pt": ["AutoModelForImageClassification"],
            "type": "image",
        },
    }
    # The layout transformers writes (`PretrainedConfig.to_json_file`).
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _to_8_bit_greyscale(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max() > 255):
        array = array / 257.0
    elif image.mode == "F" and array.max() <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
