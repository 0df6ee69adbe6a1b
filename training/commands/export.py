"""`deit-distill export MODEL --output OUT [--quantize int8] [--heads]`: ONNX for CPU deployment.

Writes OUT/model.onnx (input `pixel_values`, dynamic batch; output `logits`, the model's inference head, and with
--heads also `cls_logits` and `distillation_logits`), config.json and preprocessor_config.json, and checks the
graph against PyTorch at two batch sizes. --quantize int8 also writes OUT/model_int8.onnx and, for a run
directory, reports the top-1 of fp32 and int8 on the run's evaluation split and how often they agree.
Run the result with `deit-distill predict OUT --onnx IMAGES...` or `OnnxImageClassifier.from_pretrained(OUT)`.
OUT must be new or empty; `--overwrite true` replaces a previous export there (and nothing else) whole.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from deit_distill.training.checkpoints import check_model_folder, check_model_source
from deit_distill.training.errors import UserError, with_reason
from deit_distill.training.onnx_export import (
    EXPORT_OUTPUT,
    INT8_FILE,
    INT8_MODES,
    ONNX_FILE,
    REPORT_FILE,
    TOLERANCE,
    compare_top1,
    export_onnx,
    pixel_batches,
    quantize_int8,
    require_onnx,
    run_splits,
)
from deit_distill.training.output_files import check_output_folder, replace_output_folder
from deit_distill.training.run_record import RunRecord

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a saved model folder or a Hub id")
    add_flag(parser, "output", required=True, help="folder to write: new or empty (created if missing)")
    add_flag(
        parser,
        "overwrite",
        choices=("true", "false"),
        default="false",
        help="replace a previous export in --output whole (no file of it is kept)",
    )
    add_flag(parser, "quantize", choices=["int8"], default=None, help="also write model_int8.onnx")
    add_flag(
        parser,
        "int8_mode",
        choices=INT8_MODES,
        help="with --quantize int8: dynamic (default; weights int8, activations per batch) or static "
        "(activations calibrated on the run's training images)",
    )
    add_flag(
        parser, "calibration_samples", type=int, help="with --int8_mode static: training images (default 256)"
    )
    add_flag(parser, "heads", action="store_true", help="also output the CLS and DIST heads' logits")
    add_flag(
        parser,
        "batch_size",
        type=int,
        help="with --quantize int8 of a run: images per batch when measuring top-1 (default 64)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_source(args.model, "export")
    check_model_folder(args.model, "export")
    _check_int8_flags(args)
    if args.quantize and args.int8_mode == "static" and not RunRecord.exists(args.model):
        raise UserError(
            f"--int8_mode static calibrates on the run's training images, and {args.model} is not a training run "
            "(no run record); use --int8_mode dynamic."
        )
    overwrite = args.overwrite == "true"
    check_output_folder(args.output, "--output", EXPORT_OUTPUT, overwrite)
    require_onnx()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    except OSError as error:  # a Hub id that is not cached (offline) or does not exist
        raise UserError(
            with_reason(f"export {args.model}: cannot load it: ", error, ". Check the path or the Hub id.")
        ) from error
    output = Path(args.output)
    with replace_output_folder(output, "--output", EXPORT_OUTPUT, overwrite) as staging:
        _export(args, model, processor, staging)
    print(f"wrote {output}: {', '.join(sorted(path.name for path in output.iterdir()))}")
    return 0


def _check_int8_flags(args: argparse.Namespace) -> None:
    """Refuse an int8 flag that would do nothing, and fill in the defaults of the others."""
    is_run = RunRecord.exists(args.model)
    for name, needs, when in (
        ("int8_mode", args.quantize, "--quantize int8"),
        (
            "calibration_samples",
            args.quantize and args.int8_mode == "static",
            "--quantize int8 --int8_mode static",
        ),
        ("batch_size", args.quantize and is_run, "--quantize int8 of a training run (to measure top-1)"),
    ):
        if getattr(args, name) is not None and not needs:
            raise UserError(f"--{name} is read only with {when}: add that, or leave --{name} out.")
    args.int8_mode = args.int8_mode or "dynamic"
    args.calibration_samples = 256 if args.calibration_samples is None else args.calibration_samples
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    if args.batch_size < 1 or args.calibration_samples < 1:
        raise UserError("--batch_size and --calibration_samples must be >= 1.")


def _export(args: argparse.Namespace, model: Any, processor: Any, folder: Path) -> None:
    """Write the export into `folder`, printing what was checked and measured."""
    report = export_onnx(model, processor, folder, heads=args.heads, source=args.model)
    differences = ", ".join(f"batch {batch}: {value:.1e}" for batch, value in report.max_difference.items())
    print(
        f"exported {ONNX_FILE}: outputs {', '.join(report.outputs)}; max |onnx - torch| {differences} "
        f"(tolerance {TOLERANCE:g} x (1 + |logit|))"
    )
    if args.quantize:
        splits = (
            run_splits(args.model, processor, args.calibration_samples) if os.path.isdir(args.model) else None
        )
        calibration = (
            (pixels for pixels, _ in pixel_batches(splits.calibration, args.batch_size)) if splits else None
        )
        int8_path = quantize_int8(folder / ONNX_FILE, folder / INT8_FILE, args.int8_mode, calibration)
        sizes = {name: (folder / name).stat().st_size / 2**20 for name in (ONNX_FILE, INT8_FILE)}
        report.int8 = {"mode": args.int8_mode, "file": INT8_FILE, "size_mib": sizes[INT8_FILE]}
        print(
            f"quantized {INT8_FILE}: {args.int8_mode} int8, {sizes[INT8_FILE]:.1f} MiB (fp32 {sizes[ONNX_FILE]:.1f} MiB)"
        )
        if splits is None:
            print("no run record, so no evaluation split: int8 accuracy not measured")
        else:
            accuracy = compare_top1(
                {"fp32": folder / ONNX_FILE, "int8": int8_path}, splits.evaluation, args.batch_size
            )
            report.int8.update(accuracy)
            print(
                f"top-1 on the run's evaluation split ({accuracy['num_images']} images): fp32 {accuracy['fp32_top1']:.2f}%, "
                f"int8 {accuracy['int8_top1']:.2f}%, agreement {accuracy['agreement']:.2f}%"
            )
    report.write(folder)
    print(f"report: {REPORT_FILE}")
