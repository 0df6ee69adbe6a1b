"""`deit-distill convert`: turn transformers/timm/our checkpoints into a DeiTDistill (or native transformers) dir.

Kept outside `modeling_deit_distill/` because it may import timm, which the shipped model code must not.
Nothing is downloaded: timm models are built with `pretrained=False` and filled from a local `--checkpoint`.
--output must be new or empty; `--overwrite true` replaces a previous convert output there (and nothing else) whole.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
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
from deit_distill.training.errors import MissingPathError, UserError, with_reason
from deit_distill.training.output_files import OutputKind, check_output_folder, replace_output_folder
from deit_distill.training.run_record import EVAL_RESULTS_FILE, RUN_RECORD_FILE, TRAINER_STATE_FILE

from .flags import CommandParser, add_flag

# What convert writes (config.json, model.safetensors, preprocessor_config.json, the model's code files): a folder
# holding anything else (a training run's record, checkpoints, a card) is never replaced by --overwrite true.
CONVERT_OUTPUT = OutputKind(
    command="convert",
    what="a converted model",
    markers=("config.json",),
    suffixes=(".json", ".safetensors", ".py"),
    foreign=(RUN_RECORD_FILE, TRAINER_STATE_FILE, EVAL_RESULTS_FILE),
)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
TIMM_SOURCES = (
    "--from timm takes a weights file (.pth, .safetensors) as --source, or a timm model name (such as "
    "deit_tiny_distilled_patch16_224) with its weights as --checkpoint FILE"
)


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
    add_flag(
        parser,
        "output",
        required=True,
        type=Path,
        help="Directory for the model and image processor: new or empty (created if missing).",
    )
    add_flag(
        parser,
        "overwrite",
        choices=("true", "false"),
        default="false",
        help="Replace a previous convert output in --output whole (no file of it is kept).",
    )
    parser.add_argument(
        "--to",
        dest="target_format",
        default="deit-distill",
        choices=("deit-distill", "transformers"),
        help="'transformers' writes a native DeiTForImageClassificationWithTeacher (or ViTForImageClassification "
        "without distillation token) that loads without trust_remote_code.",
    )
    add_flag(
        parser,
        "checkpoint",
        type=Path,
        help="timm model names: the local .pth/.safetensors weights of that model.",
    )
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


def _check_timm_source(args: argparse.Namespace) -> None:
    """Refuse a --from timm --source that is neither a weights file nor a timm model name, naming what it is."""
    source = Path(args.source)
    if source.is_dir():
        weights = sorted(p.name for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        inside = f" (it holds {', '.join(weights)}: give that file)" if weights else ""
        raise UserError(f"--source {args.source} is a folder{inside}; {TIMM_SOURCES}.")
    if source.is_file():
        if args.checkpoint is not None:
            raise UserError(
                f"--checkpoint {args.checkpoint} is read only with a timm model name, and --source {args.source} "
                "is already the weights file: leave --checkpoint out."
            )
        return
    if source.suffix in WEIGHT_SUFFIXES or os.sep in args.source or "/" in args.source:
        raise MissingPathError(f"--source {args.source}: no such file; {TIMM_SOURCES}.")
    import timm  # only the CLI depends on timm

    if not timm.is_model(args.source):
        close = difflib.get_close_matches(args.source, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(
            f"--source {args.source} is neither a file nor a timm model name{hint}; {TIMM_SOURCES}."
        )
    given = [f"--{name}" for name in ("num_attention_heads", "image_size") if getattr(args, name) is not None]
    if given:
        raise UserError(
            f"{' and '.join(given)} describe a weights file given as --source; timm's {args.source} has its own: "
            "leave them out."
        )
    if args.checkpoint is None:
        raise UserError(
            f"--source {args.source} is a timm model name, and weights are never downloaded: pass its weights "
            "as --checkpoint FILE (.pth, .safetensors), or the weights file itself as --source."
        )
    if not args.checkpoint.is_file():
        raise MissingPathError(
            f"--checkpoint {args.checkpoint}: no such file; give the .pth/.safetensors weights of {args.source}."
        )


def _from_timm(args: argparse.Namespace) -> DeiTDistillForImageClassification:
    source = Path(args.source)
    if source.is_file():
        overrides = {"num_attention_heads": args.num_attention_heads, "image_size": args.image_size}
        return from_timm(
            load_state_dict_file(source), **{k: v for k, v in overrides.items() if v is not None}
        )
    import timm  # only the CLI depends on timm

    state_dict = load_state_dict_file(args.checkpoint)
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    model = timm.create_model(args.source, pretrained=False, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # other keys or shapes: the weights of another model
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(
            f"--checkpoint {args.checkpoint} does not fit timm's {args.source} ({reason[:200]}); pass the model "
            "name those weights were trained as."
        ) from None
    return from_timm(model)


def _check_arguments(args: argparse.Namespace) -> None:
    """Every mistake in the flags, before anything is loaded or written."""
    if args.source_format == "timm":
        _check_timm_source(args)
    else:
        given = [
            f"--{name}"
            for name in ("checkpoint", "num_attention_heads", "image_size")
            if getattr(args, name) is not None
        ]
        if given:
            raise UserError(
                f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} read only with --from timm; "
                f"--from {args.source_format} reads everything from --source {args.source}: leave "
                f"{'it' if len(given) == 1 else 'them'} out."
            )
        if not os.path.exists(args.source) and args.source.count("/") != 1:
            raise MissingPathError(f"--source {args.source}: no such file or folder.")
        check_model_folder(args.source, "--source")
        _check_source_kind(args.source, args.source_format)
    if not 0 < args.crop_pct <= 1:
        raise UserError(f"--crop_pct must be in (0, 1], got {args.crop_pct}.")
    check_output_folder(args.output, "--output", CONVERT_OUTPUT, args.overwrite == "true")


def _check_source_kind(source: str, source_format: str) -> None:
    """A local --source of the other kind would load with its weights re-initialised (from_pretrained only warns):
    name its kind and the --from that reads it."""
    config_file = Path(source, "config.json")
    if not config_file.is_file():
        return  # a Hub id: its loader says what it is
    config = read_json_file(config_file, "--source")
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    ours = model_type == DeiTDistillConfig.model_type
    if source_format == "deit-distill" and not ours:
        hint = (
            "--from transformers reads it"
            if any(name in TRANSFORMERS_STUDENT_CLASSES for name in architectures)
            else "only DeiT and ViT image classifiers convert (--from transformers or --from timm)"
        )
        raise UserError(
            f"--source {source} is a {model_type} model ({', '.join(architectures) or 'no architectures'}), not a "
            f"deit-distill one: {hint}."
        )
    if source_format == "transformers" and ours:
        raise UserError(
            f"--source {source} is a deit-distill model already: convert it with --from deit-distill."
        )


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
    try:
        if args.source_format == "timm":
            model = _from_timm(args)
        elif args.source_format == "transformers":
            model = _from_transformers(args.source)
        else:
            model = DeiTDistillForImageClassification.from_pretrained(args.source)
    except UserError:
        raise
    except OSError as error:  # a Hub id that is not cached (offline) or does not exist
        raise UserError(
            with_reason(f"--source {args.source}: cannot load it: ", error, ". Check the path or the Hub id.")
        ) from error
    if args.id2label is not None:
        id2label = _read_labels(args.id2label, model.config.num_labels)
        model.config.id2label = id2label
        model.config.label2id = {label: index for index, label in id2label.items()}
    output: PreTrainedModel = model
    if args.target_format == "transformers":
        output = (
            to_transformers_deit(model) if model.config.use_distillation_token else to_transformers_vit(model)
        )
    overwrite = getattr(args, "overwrite", "false") == "true"
    with replace_output_folder(args.output, "--output", CONVERT_OUTPUT, overwrite) as folder:
        output.save_pretrained(folder)
        build_image_processor(model.config, crop_pct=args.crop_pct).save_pretrained(folder)
        if args.target_format == "deit-distill":
            # The native copy must load without remote code, and a custom pipeline would require it.
            attach_pipeline(folder)
    print(f"Saved {type(output).__name__} and its image processor to {args.output}")
    return args.output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    run_convert(args)
    return 0
