"""`deit-distill views RECIPE_OR_RUN [ARGS] --output views.png`: what the recipe does to your images.

A grid: one row per training image, its original first, then the views training draws for it at epochs
`--epoch`, `--epoch + 1`, ... (each view is a pure function of its key: these are the pixels the run sees, before
Mixup/CutMix, which depends on the batch). The views go through either path (`--augment_on workers|device`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from deit_distill.training.arguments import (
    AugmentationArguments,
    DataArguments,
    check_data_arguments,
    dataclass_from_dict,
)
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.commands.flags import CommandParser, DataclassParser, add_flag, format_flag
from deit_distill.training.data import decode_image
from deit_distill.training.device_augment import AUGMENT_ON, augment_batch
from deit_distill.training.errors import UserError
from deit_distill.training.run_record import RunRecord
from deit_distill.training.transforms import (
    TRAIN_PRESETS,
    build_train_views,
    device_augment_spec_of,
    normalisation,
    with_image_transform,
)
from deit_distill.training.views import AUGMENT_PARAMS, SeededViews, ViewKey

USAGE = "deit-distill views RECIPE.json|RUN_DIR [train's data/model/augmentation flags] --output views.png"
MIN_CELL = 112  # small images (28 px) are enlarged to this, pixel for pixel


def build_parser() -> CommandParser:
    parser = CommandParser(prog="deit-distill views", usage=USAGE, add_help=False)
    views = parser.add_argument_group("Views")
    add_flag(
        views,
        "output",
        required=True,
        help="PNG/JPEG file to write (an existing one needs --overwrite true).",
    )
    add_flag(views, "num_images", type=int, default=4, help="Training images, one row each.")
    add_flag(
        views, "num_views", type=int, default=6, help="Views per image, at epochs --epoch, --epoch + 1, ..."
    )
    add_flag(views, "epoch", type=int, default=0, help="First epoch shown (0-based).")
    add_flag(views, "first_index", type=int, default=0, help="Index of the first training image shown.")
    add_flag(
        views, "overwrite", choices=("true", "false"), default="false", help="Replace an existing --output."
    )
    recipe = parser.add_argument_group("Recipe (the recipe's or the run's own unless given)")
    add_flag(recipe, "augment_on", choices=AUGMENT_ON, help="Which path draws the views: workers or device.")
    add_flag(recipe, "augmentation", choices=TRAIN_PRESETS, help="The preset: deit, light or none.")
    add_flag(recipe, "seed", type=int, help="The run's data seed.")
    return parser


def short_help(parser: CommandParser) -> str:
    lines = [f"usage: {USAGE}", "", __doc__.split(chr(10) * 2)[1].strip()]
    for group in parser._action_groups[2:]:  # argparse's own two (positionals, options) are empty here
        lines.append(f"\n{group.title}:")
        lines += [format_flag(action.dest, action.help, action.default) for action in group._group_actions]
    lines.append(
        "  Any data or model flag of `train` (--dataset_name, --image_size, ...) overrides a recipe."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token in ("-h", "--help") for token in argv):
        print(short_help(build_parser()))
        return 0
    if not argv or argv[0].startswith("-"):
        raise UserError(f"views needs a recipe (.json) or a run directory first: {USAGE}")
    source, rest = argv[0], argv[1:]
    parser = build_parser()
    options, recipe_flags = parser.parse_known_args(rest)
    _parse_recipe_flags(source, recipe_flags)  # a misspelt flag first, before anything is loaded
    output = _check_options(options)
    processor, dataset, augmentation, seed = _load(source, recipe_flags, options)
    augmentation.augment_on = options.augment_on or augmentation.augment_on
    augmentation.augmentation = options.augmentation or augmentation.augmentation
    seed = seed if options.seed is None else options.seed
    last = options.first_index + options.num_images
    if last > len(dataset):
        raise UserError(f"--first_index {options.first_index} + --num_images {options.num_images}: the training "
                        f"split has {len(dataset)} images.")  # fmt: skip
    indices = list(range(options.first_index, last))
    epochs = list(range(options.epoch, options.epoch + options.num_views))
    views = draw_views(processor, dataset, augmentation, seed, indices, epochs)
    originals = [decode_image(dataset[index]["image"], index) for index in indices]
    title = f"{augmentation.augmentation} on {augmentation.augment_on}, seed {seed}, epochs {epochs[0]}-{epochs[-1]}"
    grid(originals, views, title).save(output)
    print(f"wrote {output}: {len(indices)} images x {len(epochs)} views ({title})")
    return 0


def _check_options(options: Any) -> Path:
    for flag in ("num_images", "num_views"):
        if getattr(options, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(options, flag)}.")
    if options.epoch < 0 or options.first_index < 0:
        raise UserError("--epoch and --first_index must be >= 0.")
    output = Path(options.output)
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output {output}: write a .png or .jpg file.")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist.")
    if output.exists() and options.overwrite != "true":
        raise UserError(f"--output {output} exists; choose another file or pass --overwrite true.")
    return output


def _parse_recipe_flags(source: str, flags: list[str]) -> tuple[Any, ...]:
    """`train`'s argument groups of a recipe and its flags, or the data flags given with a run directory."""
    if source.endswith(".json"):
        from deit_distill.training.commands.train import parse_args

        return parse_args([source, *flags], command="views")
    if not Path(source).is_dir():
        raise UserError(f"{source} is neither a recipe (.json) nor a run directory.")
    return DataclassParser((DataArguments,)).parse_flags(flags, " (views takes data flags with a run)")


def _load(source: str, flags: list[str], options: Any) -> tuple[Any, Any, AugmentationArguments, int]:
    """The student's image processor, the training split, the augmentation settings and the data seed."""
    if source.endswith(".json"):
        from deit_distill.training.models import build_model, check_model_arguments

        groups = _parse_recipe_flags(source, flags)
        model_args, data_args, augmentation, *_, training_args, _ = groups
        check_data_arguments(data_args)
        check_model_arguments(model_args)
        dataset = data_args.load(training_args.seed, unlabeled=False)
        names = dataset["train"].features["label"].names
        processor = build_model(model_args, dict(enumerate(names))).image_processor
        return processor, dataset["train"], augmentation, training_args.seed
    from transformers import AutoImageProcessor

    from deit_distill.training.commands.evaluate import resolve_data

    record = RunRecord.read(source)
    (data_args,) = _parse_recipe_flags(source, flags)
    data_args, seed = resolve_data(source, flags, data_args, None)
    check_data_arguments(data_args)
    augmentation = dataclass_from_dict(AugmentationArguments, record.data)
    processor = AutoImageProcessor.from_pretrained(source)
    return processor, data_args.load(seed, unlabeled=False)["train"], augmentation, seed


def draw_views(
    processor: Any,
    dataset: Any,
    augmentation: AugmentationArguments,
    seed: int,
    indices: list[int],
    epochs: list[int],
) -> list[list[np.ndarray]]:
    """`views[i][e]`: image `indices[i]` as training draws it at `epochs[e]`, uint8 `(H, W, 3)`."""
    transform = build_train_views(processor, augmentation.augmentation, augmentation.augment_on)
    examples = SeededViews(with_image_transform(dataset, transform))
    keys = [ViewKey(seed, epoch, 0, index) for index in indices for epoch in epochs]
    batch = examples.__getitems__(keys)
    for example in batch:
        example.pop("view")
    if augmentation.augment_on == "device" and augmentation.augmentation != "none":
        spec = device_augment_spec_of(processor, augmentation.augmentation)
        collated = DistillationCollator(device_augment=spec)(batch)
        pixels = augment_batch(collated["pixel_values"], collated[AUGMENT_PARAMS])
    else:
        pixels = torch.stack([example["pixel_values"] for example in batch])
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalisation(processor))
    images = ((pixels * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [list(images[row * len(epochs) : (row + 1) * len(epochs)]) for row in range(len(indices))]


def grid(originals: list[Image.Image], views: list[list[np.ndarray]], title: str) -> Image.Image:
    """Originals in the first column, their views after, on a white sheet with a one-line title."""
    height, width = views[0][0].shape[:2]
    scale = max(1, -(-MIN_CELL // min(height, width)))
    cell_h, cell_w, gap, top = height * scale, width * scale, 4, 20
    columns = 1 + len(views[0])
    sheet = Image.new(
        "RGB", (columns * (cell_w + gap) + gap, top + len(views) * (cell_h + gap) + gap), "white"
    )
    ImageDraw.Draw(sheet).text((gap, 4), f"original | {title}", fill="black")
    for row, (original, row_views) in enumerate(zip(originals, views, strict=True)):
        y = top + gap + row * (cell_h + gap)
        ratio = min(cell_w / original.width, cell_h / original.height)
        size = (max(1, round(original.width * ratio)), max(1, round(original.height * ratio)))
        thumbnail = original.resize(size, Image.Resampling.NEAREST if ratio > 1 else Image.Resampling.BICUBIC)
        sheet.paste(thumbnail, (gap + (cell_w - thumbnail.width) // 2, y + (cell_h - thumbnail.height) // 2))
        for column, view in enumerate(row_views, start=1):
            cell = Image.fromarray(view).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            sheet.paste(cell, (gap + column * (cell_w + gap), y))
    return sheet
