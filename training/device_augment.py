"""The DeiT train transform applied to a whole uint8 batch on the training device, with per-sample parameters.

`--augment_on device` splits timm's train transform (`transforms.build_train_transform`) in two:

- on the host, in the data-loader worker, `DecodeForDevice` decodes an image (with JPEG's reduced decoding where
  the crop allows it), cuts out the RandomResizedCrop box at a bounded size (at most `CANVAS_SCALE` times the
  output side, by an integer box-filter reduction) and draws every random parameter of the view: the crop, the
  flip, RandAugment's two layers (op, whether it applies, magnitude with noise, sign) and random erasing. The draws
  use timm's own parameter code where it is separable (`RandomResizedCropAndInterpolation.get_params`, the ops'
  level functions) and Python's/NumPy's global generators, which `SeededViews` seeds from the view's key: so a
  view is a pure function of its `ViewKey`, as on the worker path.
- on the device, `augment_batch` turns the stacked uint8 canvases and the stacked parameters into the normalised,
  augmented, mixed float batch: ONE bicubic resample for all geometric ops (crop, flip, rotate, shear, translate,
  composed into one affine map per sample, one `grid_sample` for the batch), the colour ops grouped by op over
  the batch (index_select / index_copy; grouping is read from the host copy of the parameters, so there is no
  device-to-host sync), normalisation, per-pixel random erasing (noise from a counter-based hash of a per-sample
  seed, so it does not depend on the batch's layout) and Mixup/CutMix (the collator's host draw).

Where it differs from timm's PIL pipeline (measured in tests/test_device_augment.py): bicubic resampling is
PyTorch's (a = -0.75, no antialias) instead of PIL's (a = -0.5, antialiased), and the geometric ops are one
resample instead of one per op; a crop larger than the output is first box-reduced by an integer factor so the
remaining downscale is under 2x. Colour ops that timm applies before a geometric op see the pixels of the
resampled image (their statistics over the pixels that are not fill), and keep timm's fill where the geometric op
fills.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from .data import decode_image

AUGMENT_ON = ("workers", "device")
# The crop box is cut out at most this many times the output side (after an integer reduction), so a canvas of
# (2H, 2W) uint8 holds every box and the resample's remaining downscale stays under 2x.
CANVAS_SCALE = 2
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# timm's `_RAND_INCREASING_TRANSFORMS`, in its order; the op codes of the parameters index this tuple.
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
NO_OP = -1
ERASE_PROB, ERASE_AREA, ERASE_MIN_ASPECT = 0.25, (0.02, 1 / 3), 0.3  # timm's RandomErasing, 'pixel' mode
_GEOMETRIC_CODES = frozenset(OPS.index(name) for name in GEOMETRIC_OPS)
_JPEG_DRAFT_SCALES = (8, 4, 2)


@dataclass(frozen=True)
class DeviceAugmentSpec:
    """What the device path needs to know of the recipe: sizes, normalisation, and which ops it draws.

    Attributes:
        output_hw: The training resolution `(H, W)`.
        mean, std: Normalisation, as the processor's (in [0, 1] units).
        interpolation: Resampling of the crop and geometric ops ("bicubic" for DeiT, or "bilinear").
        scale, ratio: RandomResizedCrop's area and aspect-ratio ranges.
        rand_augment: Whether RandAugment `rand-m9-mstd0.5-inc1` and random erasing apply ("deit") or not
            ("light": crop and flip only).
    """

    output_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rand_augment: bool = True

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return self.output_hw[0] * CANVAS_SCALE, self.output_hw[1] * CANVAS_SCALE

    @property
    def fill(self) -> tuple[int, int, int]:
        """timm's fill colour of the geometric ops: the mean in 0-255 levels."""
        return tuple(min(255, round(255 * value)) for value in self.mean)

    def rand_augment_ops(self) -> list[Any]:
        """timm's own `AugmentOp`s of the recipe (their probability, magnitude, noise and level functions)."""
        hparams = {
            "translate_const": int(min(self.output_hw) * 0.45),
            "img_mean": self.fill,
        }
        ops = rand_augment_transform(RAND_AUGMENT, hparams).ops
        assert tuple(op.name for op in ops) == OPS, "timm's increasing RandAugment ops changed"
        return ops


def device_augment_spec(
    output_hw: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    preset: str,
    interpolation: str = "bicubic",
) -> DeviceAugmentSpec:
    """The spec of a train preset ("deit" or "light"; "none" has nothing to do on the device)."""
    if preset not in ("deit", "light"):
        raise ValueError(f"--augment_on device runs the 'deit' or 'light' preset, got {preset!r}.")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return DeviceAugmentSpec(
        output_hw=tuple(output_hw),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        scale=(0.08, 1.0) if preset == "deit" else (0.8, 1.0),
        rand_augment=preset == "deit",
    )


# ---------------------------------------------------------------------------------------------------------------
# Host: decode and draw (in the data-loader worker)


class DecodeForDevice:
    """Worker transform of `--augment_on device`: an undecoded image -> uint8 canvas + the view's parameters.

    Returns `{"pixel_values": (h, w, 3) uint8 crop box, at most the canvas, "augment_params": {name: tensor}}`
    (the collator lays the boxes into one canvas, `stack_canvases`); the parameters are drawn
    from Python's and NumPy's global generators (seeded per view by `SeededViews`), in timm's order of draws.
    """

    takes_undecoded = True

    def __init__(self, spec: DeviceAugmentSpec, reduced_decoding: bool = True) -> None:
        self.spec = spec
        self.ops = spec.rand_augment_ops() if spec.rand_augment else []
        # JPEG's DCT-domain reduction when the crop box is at least twice the output (off: for measuring it).
        self.reduced_decoding = reduced_decoding

    def __call__(self, value: Any, index: int | None = None) -> dict[str, Any]:
        image, decoded = _open(value, index)
        box = RandomResizedCropAndInterpolation.get_params(image, self.spec.scale, self.spec.ratio)
        canvas, to_canvas, bounds = self._cut_out(image, decoded, box, index)
        params = self.draw_params()
        affine = to_canvas @ crop_matrix(box, self.spec.output_hw) @ params.pop("geometry")
        return {
            "pixel_values": torch.from_numpy(canvas),
            "augment_params": {
                "affine": torch.from_numpy(affine[:2].astype(np.float32)),
                "bounds": torch.tensor(bounds, dtype=torch.float32),
                **params,
            },
        }

    def draw_params(self) -> dict[str, Any]:
        """Flip, RandAugment and erasing of one view, from the global generators (after the crop's draws).

        Returns the geometric part as one 3x3 map of output pixel coordinates to the cropped image's
        (`"geometry"`), the colour ops as codes and arguments per layer, and the erasing box.
        """
        width = self.spec.output_hw[1]
        geometry = np.eye(3)
        if random.random() < 0.5:
            geometry = geometry @ np.array([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]])
        codes, args = [NO_OP, NO_OP], [0.0, 0.0]
        erase = [0.0, 0.0, 0.0, 0.0, 0.0]
        if self.ops:
            # timm's RandAugment: two ops with replacement (NumPy's choice), each then timm's `AugmentOp.__call__`.
            chosen = np.random.choice(len(self.ops), 2, replace=True)
            for layer, code in enumerate(chosen.tolist()):
                op = self.ops[code]
                if op.prob < 1.0 and random.random() > op.prob:
                    continue
                magnitude = op.magnitude
                if op.magnitude_std == float("inf"):
                    magnitude = random.uniform(0, magnitude)
                elif op.magnitude_std > 0:
                    magnitude = random.gauss(magnitude, op.magnitude_std)
                magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
                level = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else (0.0,)
                codes[layer], args[layer] = code, float(level[0])
                if op.name in GEOMETRIC_OPS:
                    geometry = geometry @ geometric_matrix(op.name, args[layer], self.spec.output_hw)
            erase = draw_erasing(self.spec.output_hw)
        return {
            "geometry": geometry,
            "ops": torch.tensor(codes, dtype=torch.long),
            "args": torch.tensor(args, dtype=torch.float32),
            "erase": torch.tensor(erase, dtype=torch.float32),
            "noise_seed": torch.tensor(random.getrandbits(62), dtype=torch.long),
        }

    def _cut_out(
        self, image: Image.Image, decoded: bool, box: tuple[int, int, int, int], index: int | None
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
        """The crop box at a bounded size in a fixed canvas; the map of original to canvas coordinates; the
        box's bounds in the canvas `(x0, y0, x1, y1)`."""
        top, left, box_h, box_w = box
        (out_h, out_w), (canvas_h, canvas_w) = self.spec.output_hw, self.spec.canvas_hw
        factor = max(1, min(box_h // out_h, box_w // out_w))
        draft = 1 if decoded or not self.reduced_decoding else _draft_scale(image, factor)
        if draft > 1:
            image.draft(image.mode, (math.ceil(image.width / draft), math.ceil(image.height / draft)))
        scale_x = scale_y = 1.0 / draft
        if not decoded:
            image = decode_image(image, index)
        # The box in decoded pixels, cut on whole pixels; the fraction stays in the map.
        x0, y0 = math.floor(left * scale_x), math.floor(top * scale_y)
        x1 = min(image.width, math.ceil((left + box_w) * scale_x))
        y1 = min(image.height, math.ceil((top + box_h) * scale_y))
        reduce = max(1, factor // draft)
        while math.ceil((y1 - y0) / reduce) > canvas_h - 2 or math.ceil((x1 - x0) / reduce) > canvas_w - 2:
            reduce += 1
        cut = image.crop((x0, y0, x1, y1))
        if reduce > 1:
            cut = cut.reduce(reduce)
        canvas = np.array(cut)  # the box alone, writable; `stack_canvases` lays it into the batch canvas
        to_canvas = np.array(
            [
                [scale_x / reduce, 0, -x0 / reduce],
                [0, scale_y / reduce, -y0 / reduce],
                [0, 0, 1.0],
            ]
        )
        corners = to_canvas @ np.array([[left, left + box_w], [top, top + box_h], [1, 1]])
        return canvas, to_canvas, (corners[0, 0], corners[1, 0], corners[0, 1], corners[1, 1])


def _open(value: Any, index: int | None) -> tuple[Image.Image, bool]:
    """The image and whether it is decoded: a JPEG without EXIF rotation stays undecoded (header read only) so
    that it can be decoded reduced; anything else is decoded upright by `decode_image` (its errors included)."""
    try:
        if isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (str, dict)):
            image = Image.open(value if isinstance(value, str) else value["path"])
        else:
            image = None
        # Reading EXIF costs ~50 us; an image without an EXIF block is upright.
        exif = image is not None and "exif" in image.info
        upright = image is not None and (not exif or image.getexif().get(ExifTags.Base.Orientation, 1) == 1)
        if upright and image.format == "JPEG" and image.mode in ("RGB", "L"):
            return image, False
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass
    return decode_image(value, index), True


def _draft_scale(image: Image.Image, factor: int) -> int:
    """JPEG's DCT-domain reduction (1/2, 1/4, 1/8) that does not reduce more than `factor`."""
    return next((scale for scale in _JPEG_DRAFT_SCALES if scale <= factor), 1)


def crop_matrix(box: tuple[int, int, int, int], output_hw: tuple[int, int]) -> np.ndarray:
    """Map of the resized crop's continuous pixel coordinates to the original image's (RandomResizedCrop)."""
    top, left, box_h, box_w = box
    return np.array([[box_w / output_hw[1], 0, left], [0, box_h / output_hw[0], top], [0, 0, 1.0]])


def geometric_matrix(name: str, arg: float, output_hw: tuple[int, int]) -> np.ndarray:
    """PIL's inverse map (output -> input continuous coordinates) of one of timm's geometric ops."""
    height, width = output_hw
    if name == "ShearX":
        return np.array([[1, arg, 0], [0, 1, 0], [0, 0, 1.0]])
    if name == "ShearY":
        return np.array([[1, 0, 0], [arg, 1, 0], [0, 0, 1.0]])
    if name == "TranslateXRel":
        return np.array([[1, 0, arg * width], [0, 1, 0], [0, 0, 1.0]])
    if name == "TranslateYRel":
        return np.array([[1, 0, 0], [0, 1, arg * height], [0, 0, 1.0]])
    # Rotate: PIL's `Image.rotate` (counter-clockwise by `arg` degrees about the centre).
    angle = -math.radians(arg)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    return np.array(
        [
            [cos, sin, cx - cos * cx - sin * cy],
            [-sin, cos, cy + sin * cx - cos * cy],
            [0, 0, 1.0],
        ]
    )


def draw_erasing(output_hw: tuple[int, int]) -> list[float]:
    """timm's `RandomErasing._erase` draws (p 0.25, one box): `[applies, top, left, h, w]`."""
    height, width = output_hw
    if random.random() > ERASE_PROB:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(10):
        target_area = random.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(random.uniform(*log_aspect))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < width and h < height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            return [1.0, float(top), float(left), float(h), float(w)]
    return [0.0, 0.0, 0.0, 0.0, 0.0]


def stack_canvases(cuts: list[torch.Tensor], canvas_hw: tuple[int, int]) -> torch.Tensor:
    """The workers' crop boxes `(h, w, 3)` laid at the top left of one `(B, Hc, Wc, 3)` uint8 batch, each with two
    replicated pixels past its right and bottom edges (a bicubic kernel's reach, so edges do not blend with 0)."""
    shape = (len(cuts), *canvas_hw, 3)
    if torch.utils.data.get_worker_info() is not None:
        # In a data-loader worker, straight into shared memory, as torch's default collate does (no copy to it).
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
        batch = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        batch = torch.empty(shape, dtype=torch.uint8)
    # Left uninitialised past each box: no output pixel reads there (outside a box is fill, see `resample`).
    for canvas, cut in zip(batch, cuts, strict=True):
        h, w = cut.shape[:2]
        canvas[:h, :w] = cut
        canvas[:h, w : w + 2] = cut[:, -1:]
        canvas[h : h + 2, : w + 2] = canvas[h - 1 : h, : w + 2]
    return batch


def collate_params(
    params: list[dict[str, torch.Tensor]], spec: DeviceAugmentSpec, mix: tuple[float, tuple | None]
) -> dict[str, torch.Tensor]:
    """Stack per-sample parameters and add the batch's: normalisation, fill, output size and the mix draw."""
    batch = {name: torch.stack([p[name] for p in params]) for name in params[0]}
    lam, box = mix
    batch["mix"] = torch.tensor([lam, *(box if box is not None else (-1, -1, -1, -1))], dtype=torch.float32)
    batch["mean"] = torch.tensor(spec.mean, dtype=torch.float32)
    batch["std"] = torch.tensor(spec.std, dtype=torch.float32)
    batch["fill"] = torch.tensor(spec.fill, dtype=torch.float32)
    batch["output_hw"] = torch.tensor(spec.output_hw, dtype=torch.long)
    batch["bicubic"] = torch.tensor(spec.interpolation == "bicubic")
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Device: the whole batch at once


def augment_batch(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 canvases `(B, Hc, Wc, 3)` (on the device) + host parameters -> the normalised training batch.

    The batch's float work happens on `images.device`; the parameters are small host tensors moved once.
    """
    device = images.device
    host = params
    params = {name: value.to(device, non_blocking=True) for name, value in host.items()}
    height, width = host["output_hw"].tolist()
    fill = params["fill"].view(1, 3, 1, 1)
    pixels, valid = resample(
        images, params["affine"], params["bounds"], (height, width), bool(host["bicubic"])
    )
    pixels = torch.where(valid, pixels, fill)
    ops = host["ops"]
    geometric = torch.zeros_like(ops, dtype=torch.bool)
    for code in _GEOMETRIC_CODES:
        geometric |= ops == code
    for layer in range(ops.shape[1]):
        # A colour op timm applies before a geometric op saw no fill: its statistics skip the fill, and the fill
        # stays the fill colour after it.
        before_geometry = geometric[:, layer + 1 :].any(dim=1)
        for code in torch.unique(ops[:, layer]).tolist():
            if code == NO_OP or code in _GEOMETRIC_CODES:
                continue
            members = torch.nonzero(ops[:, layer] == code).flatten()
            index = members.to(device, non_blocking=True)
            group = pixels.index_select(0, index)
            keep_fill = before_geometry[members].to(device, non_blocking=True).view(-1, 1, 1, 1)
            counted = valid.index_select(0, index) | ~keep_fill
            args = params["args"][:, layer].index_select(0, index)
            group = COLOUR_OPS[OPS[code]](group, args, counted)
            group = torch.where(counted, group, fill)
            pixels.index_copy_(0, index, group)
    std = params["std"].view(1, 3, 1, 1)
    pixels = pixels.mul_(1.0 / (255.0 * std)).sub_(params["mean"].view(1, 3, 1, 1) / std)
    pixels = erase(pixels, params["erase"], params["noise_seed"], host["erase"][:, 0] > 0)
    lam, *box = host["mix"].tolist()
    if lam < 1.0:
        pixels = mix_pixels(pixels, lam, None if box[0] < 0 else tuple(int(v) for v in box))
    return pixels


def resample(
    images: torch.Tensor,
    affine: torch.Tensor,
    bounds: torch.Tensor,
    output_hw: tuple[int, int],
    bicubic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One `grid_sample` of every sample's map: `(B, 3, H, W)` levels (rounded, as PIL's uint8) and the mask of
    output pixels whose source lies in the crop box (`(B, 1, H, W)`; elsewhere timm's geometric ops fill)."""
    height, width = output_hw
    canvas_h, canvas_w = images.shape[1:3]
    ys = torch.arange(height, device=images.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=images.device, dtype=torch.float32) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(1, height * width, 3)
    source = points @ affine.transpose(1, 2)  # (B, H*W, 2), canvas pixel coordinates
    source = source.view(-1, height, width, 2)
    x0, y0, x1, y1 = (bounds[:, i].view(-1, 1, 1) for i in range(4))
    inside = (source[..., 0] >= x0) & (source[..., 0] < x1) & (source[..., 1] >= y0) & (source[..., 1] < y1)
    scale = torch.tensor([2.0 / canvas_w, 2.0 / canvas_h], device=images.device)
    grid = source * scale - 1.0
    float_images = images.permute(0, 3, 1, 2).float()
    mode = "bicubic" if bicubic else "bilinear"
    pixels = F.grid_sample(float_images, grid, mode=mode, padding_mode="border", align_corners=False)
    return pixels.round_().clamp_(0, 255), inside.unsqueeze(1)


def mix_pixels(pixels: torch.Tensor, lam: float, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    """Mixup (`box` None) or CutMix of each example with its neighbour (0 with 1, 2 with 3, ...; an odd batch's last
    example with itself): the one pixel mix of both paths (`DistillationCollator`)."""
    size = pixels.shape[0]
    partner = torch.arange(size, device=pixels.device) ^ 1
    partner[partner == size] = size - 1
    if box is None:
        return pixels[partner].mul_(1.0 - lam).add_(pixels, alpha=lam)
    y0, y1, x0, x1 = box
    pixels = pixels.clone()
    pixels[:, :, y0:y1, x0:x1] = pixels[partner, :, y0:y1, x0:x1]
    return pixels


# ---------------------------------------------------------------------------------------------------------------
# Colour ops on groups `(G, 3, H, W)` of float levels in [0, 255]; `args` `(G,)`; `counted` `(G, 1, H, W)` bool,
# the pixels that enter an op's statistics. Each returns whole levels, as PIL's uint8 ops do.


def _per_sample(args: torch.Tensor) -> torch.Tensor:
    return args.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's `Image.blend` (what ImageEnhance does): degenerate + factor * (image - degenerate), truncated to uint8.
    return (degenerate + _per_sample(factor) * (image - degenerate)).clamp(0, 255).floor()


def _grey(image: torch.Tensor) -> torch.Tensor:
    # PIL's RGB -> L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
    r, g, b = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def auto_contrast(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    low = torch.where(counted, image, torch.full_like(image, 255.0)).amin(dim=(2, 3), keepdim=True)
    high = torch.where(counted, image, torch.zeros_like(image)).amax(dim=(2, 3), keepdim=True)
    stretch = high > low
    scale = 255.0 / (high - low).clamp(min=1.0)
    out = torch.floor(image * scale - low * scale).clamp(0, 255)
    return torch.where(stretch, out, image)


def equalize(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    groups, channels = image.shape[:2]
    levels = image.long().reshape(groups * channels, -1)
    weight = counted.expand_as(image).reshape(groups * channels, -1).float()
    histogram = torch.zeros(groups * channels, 256, device=image.device).scatter_add_(1, levels, weight)
    # PIL: step = (count - count of the highest level present) // 255; lut[i] = (step // 2 + cumsum[< i]) // step.
    highest = 255 - torch.argmax((histogram.flip(1) > 0).long(), dim=1, keepdim=True)
    step = torch.div(
        histogram.sum(1, keepdim=True) - histogram.gather(1, highest), 255, rounding_mode="floor"
    )
    before = torch.cumsum(histogram, 1) - histogram
    lut = torch.div(
        torch.div(step, 2, rounding_mode="floor") + before, step.clamp(min=1), rounding_mode="floor"
    )
    identity = torch.arange(256, device=image.device, dtype=lut.dtype).expand_as(lut)
    lut = torch.where(step > 0, lut.clamp(0, 255), identity)
    return lut.gather(1, levels).view_as(image)


def invert(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return 255.0 - image


def posterize(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # Bits to keep; 0 bits gives black (see `transforms._posterize_keeping_zero_bits`), 8 or more the image.
    bits = _per_sample(args).clamp(0, 8)
    step = torch.pow(2.0, 8 - bits)
    return torch.floor(image / step) * step


def solarize(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= _per_sample(args), 255.0 - image, image)


def solarize_add(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return torch.where(image < 128, (image + _per_sample(args)).clamp(max=255), image)


def color(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(image).expand_as(image), image, args)


def contrast(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    grey = _grey(image)
    weight = counted.float()
    mean = torch.floor(
        (grey * weight).sum(dim=(2, 3), keepdim=True) / weight.sum(dim=(2, 3), keepdim=True) + 0.5
    )
    return _blend(mean.expand_as(image), image, args)


def brightness(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(image), image, args)


def sharpness(image: torch.Tensor, args: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH filter (3x3, centre 5, others 1, /13, rounded); the one-pixel border stays as it is.
    kernel = torch.ones(3, 1, 3, 3, device=image.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = torch.floor(F.conv2d(image, kernel / 13.0, groups=3) + 0.5)
    degenerate = image.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, image, args)


COLOUR_OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
}


# ---------------------------------------------------------------------------------------------------------------
# Random erasing: per-pixel normal noise from a counter-based hash, so a view's noise depends on its seed only.


def _logical_shift(value: torch.Tensor, bits: int) -> torch.Tensor:
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(value: torch.Tensor) -> torch.Tensor:
    # Wrapping int64 arithmetic (two's complement), as on every device PyTorch runs on.
    value = value + -7046029254386353131  # 0x9E3779B97F4A7C15
    value = (value ^ _logical_shift(value, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    value = (value ^ _logical_shift(value, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return value ^ _logical_shift(value, 31)


def hash_normal(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`(len(seeds), *shape)` standard normal noise, a pure function of each seed (Box-Muller on splitmix64)."""
    count = math.prod(shape)
    counter = torch.arange(count, device=seeds.device, dtype=torch.long).view(1, -1)
    bits = _splitmix64(_splitmix64(seeds.view(-1, 1)) + counter)
    uniform_1 = (_logical_shift(bits, 40).float() + 0.5) / 2**24
    uniform_2 = ((bits & 0xFFFFFF).float() + 0.5) / 2**24
    normal = torch.sqrt(-2.0 * torch.log(uniform_1)) * torch.cos(2 * math.pi * uniform_2)
    return normal.view(-1, *shape)


def erase(
    pixels: torch.Tensor, boxes: torch.Tensor, seeds: torch.Tensor, applies: torch.Tensor
) -> torch.Tensor:
    """timm's 'pixel' random erasing of the normalised batch: `boxes` `(B, 5)` `[applies, top, left, h, w]`;
    `applies` is the host copy of the first column (which samples to touch, read without a device sync)."""
    members = torch.nonzero(applies).flatten()
    if len(members) == 0:
        return pixels
    index = members.to(pixels.device, non_blocking=True)
    height, width = pixels.shape[-2:]
    box = boxes.index_select(0, index)
    ys = torch.arange(height, device=pixels.device).view(1, 1, height, 1)
    xs = torch.arange(width, device=pixels.device).view(1, 1, 1, width)
    top, left, h, w = (box[:, i].view(-1, 1, 1, 1) for i in range(1, 5))
    region = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    noise = hash_normal(seeds.index_select(0, index), tuple(pixels.shape[1:])).to(pixels.dtype)
    group = torch.where(region, noise, pixels.index_select(0, index))
    return pixels.index_copy_(0, index, group)
