"""`deit-distill convert`: turn transformers/timm/our checkpoints into a DeiTDistill (or native transformers) dir.

Kept outside `modeling_deit_distill/` because it may import timm, which the shipped model code must not.
Nothing is downloaded: timm models are built with `pretrained=False` and filled from a local `--checkpoint`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel

from deit_distill.modeling_deit_distill import (
    DeiTDistillForImageClassification,
    attach_pipeline,
    build_image_processor,
    from_timm,
    from_transformers_deit,
    to_transformers_deit,
    to_transformers_vit,
)
from deit_distill.training.checkpoints import (
    TRANSFORMERS_STUDENT_CLASSES,
    check_model_folder,
    load_state_dict_file,
    read_json_file,
)
from deit_distill.training.errors import MissingPathError, UserError

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=("transformers", "timm", "deit-distill"),
        help="Format of --source.",
    )
    add_flag(
        parser,
        "source",
        required=True,
        help="transformers: model dir or cached Hub id; timm: model name (e.g. deit_tiny_distilled_patch16_224) "
        "or a checkpoint file; deit-distill: a saved model dir.",
    )
    add_flag(parser, "output", required=True, type=Path, help="Directory for the model and image processor.")
    parser.add_argument(
        "--to",
        dest="target_format",
        default="deit-distill",
        choices=("deit-distill", "transformers"),
        help="'transformers' writes a native DeiTForImageClassificationWithTeacher (or ViTForImageClassification "
        "without distillation token) that loads without trust_remote_code.",
    )
    add_flag(parser, "checkpoint", type=Path, help="timm: local .pth/.safetensors weights for a model name.")
    add_flag(
        parser,
        "num_attention_heads",
        type=int,
        help="timm checkpoint files: heads per block (Ti/S/B: 3/6/12).",
    )
    add_flag(
        parser,
        "image_size",
        nargs=2,
        type=int,
        metavar=("HEIGHT", "WIDTH"),
        help="timm checkpoint files whose position embedding is not a square grid: the input resolution.",
    )
    add_flag(parser, "id2label", type=Path, help="JSON file mapping class index to label name.")
    add_flag(parser, "crop_pct", type=float, default=0.875, help="Eval resize ratio of the saved processor.")
    return parser


def _from_timm(args: argparse.Namespace) -> DeiTDistillForImageClassification:
    source = Path(args.source)
    if source.is_file():
        overrides = {"num_attention_heads": args.num_attention_heads, "image_size": args.image_size}
        return from_timm(
            load_state_dict_file(source), **{k: v for k, v in overrides.items() if v is not None}
        )
    if args.checkpoint is None:
        raise UserError(
            f"--from timm --source {args.source} needs --checkpoint FILE: weights are never downloaded."
        )
    import timm  # only the CLI depends on timm

    state_dict = load_state_dict_file(args.checkpoint)
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    model = timm.create_model(args.source, pretrained=False, num_classes=num_classes)
    model.load_state_dict(state_dict, strict=True)
    return from_timm(model)


def _from_transformers(source: str) -> DeiTDistillForImageClassification:
    architectures = AutoConfig.from_pretrained(source).architectures or []
    # AutoModelForImageClassification would load a WithTeacher checkpoint without its distillation head.
    cls = next(
        (TRANSFORMERS_STUDENT_CLASSES[a] for a in architectures if a in TRANSFORMERS_STUDENT_CLASSES), None
    )
    if cls is None:
        raise UserError(
            f"{source}: architectures {architectures} are not one of {sorted(TRANSFORMERS_STUDENT_CLASSES)}."
        )
    return from_transformers_deit(cls.from_pretrained(source))


def _read_labels(path: Path, num_labels: int) -> dict[int, str]:
    labels = read_json_file(path, "--id2label")
    try:
        id2label = {int(k): v for k, v in labels.items()}
    except ValueError as error:  # a key that is not a class index
        raise UserError(f"--id2label {path}: keys must be class indices ({error}).") from None
    if sorted(id2label) != list(range(num_labels)):
        raise UserError(f"{path} must name classes 0..{num_labels - 1} (the model has {num_labels} classes).")
    return id2label


def run_convert(args: argparse.Namespace) -> Path:
    """Convert `--source` and save it with its image processor to `--output`; returns the output dir."""
    if args.source_format == "timm":
        model = _from_timm(args)
    elif args.source_format == "transformers":
        model = _from_transformers(args.source)
    else:
        model = DeiTDistillForImageClassification.from_pretrained(args.source)
    if args.id2label is not None:
        id2label = _read_labels(args.id2label, model.config.num_labels)
        model.config.id2label = id2label
        model.config.label2id = {label: index for index, label in id2label.items()}
    output: PreTrainedModel = model
    if args.target_format == "transformers":
        output = (
            to_transformers_deit(model) if model.config.use_distillation_token else to_transformers_vit(model)
        )
    output.save_pretrained(args.output)
    build_image_processor(model.config, crop_pct=args.crop_pct).save_pretrained(args.output)
    if args.target_format == "deit-distill":
        # The native copy must load without remote code, and a custom pipeline would require it.
        attach_pipeline(args.output)
    print(f"Saved {type(output).__name__} and its image processor to {args.output}")
    return args.output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.source_format == "timm" and not os.path.exists(args.source) and args.source.count("/") != 1:
        raise MissingPathError(f"--source {args.source}: no such file or folder.")
    if args.source_format != "timm":
        check_model_folder(args.source, "--source")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder: choose a folder path.")
    run_convert(args)
    return 0
