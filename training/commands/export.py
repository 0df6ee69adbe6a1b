"""`deit-distill export MODEL --output OUT [--quantize int8] [--heads]`: ONNX for CPU deployment.

Writes OUT/model.onnx (input `pixel_values`, dynamic batch; output `logits`, the model's inference head, and with
--heads also `cls_logits` and `distillation_logits`), config.json and preprocessor_config.json, and checks the
graph against PyTorch at two batch sizes. --quantize int8 also writes OUT/model_int8.onnx and, for a run
directory, reports the top-1 of fp32 and int8 on the run's evaluation split and how often they agree.
Run the result with `deit-distill predict OUT --onnx IMAGES...` or `OnnxImageClassifier.from_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deit_distill.training.checkpoints import check_model_folder, check_model_source
from deit_distill.training.errors import UserError
from deit_distill.training.onnx_export import (
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
from deit_distill.training.run_record import RunRecord

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a saved model folder or a Hub id")
    add_flag(parser, "output", required=True, help="folder to write (created if missing)")
    add_flag(parser, "quantize", choices=["int8"], default=None, help="also write model_int8.onnx")
    add_flag(
        parser,
        "int8_mode",
        choices=INT8_MODES,
        default="dynamic",
        help="dynamic (default; weights int8, activations per batch) or static (activations calibrated on the "
        "run's training images)",
    )
    add_flag(parser, "calibration_samples", type=int, default=256, help="training images for static int8")
    add_flag(parser, "heads", action="store_true", help="also output the CLS and DIST heads' logits")
    add_flag(parser, "batch_size", type=int, default=64, help="images per batch when measuring top-1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_source(args.model, "export")
    check_model_folder(args.model, "export")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder: choose a folder path.")
    if args.batch_size < 1 or args.calibration_samples < 1:
        raise UserError("--batch_size and --calibration_samples must be >= 1.")
    if args.quantize and args.int8_mode == "static" and not RunRecord.exists(args.model):
        raise UserError(
            f"--int8_mode static calibrates on the run's training images, and {args.model} is not a training run "
            "(no run record); use --int8_mode dynamic."
        )
    require_onnx()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    output = Path(args.output)
    report = export_onnx(model, processor, output, heads=args.heads, source=args.model)
    differences = ", ".join(f"batch {batch}: {value:.1e}" for batch, value in report.max_difference.items())
    print(
        f"wrote {output / ONNX_FILE}: outputs {', '.join(report.outputs)}; max |onnx - torch| {differences} "
        f"(tolerance {TOLERANCE:g} x (1 + |logit|))"
    )
    if args.quantize:
        splits = (
            run_splits(args.model, processor, args.calibration_samples) if os.path.isdir(args.model) else None
        )
        calibration = (
            (pixels for pixels, _ in pixel_batches(splits.calibration, args.batch_size)) if splits else None
        )
        int8_path = quantize_int8(output / ONNX_FILE, output / INT8_FILE, args.int8_mode, calibration)
        sizes = {name: (output / name).stat().st_size / 2**20 for name in (ONNX_FILE, INT8_FILE)}
        report.int8 = {"mode": args.int8_mode, "file": INT8_FILE, "size_mib": sizes[INT8_FILE]}
        print(
            f"wrote {int8_path}: {args.int8_mode} int8, {sizes[INT8_FILE]:.1f} MiB (fp32 {sizes[ONNX_FILE]:.1f} MiB)"
        )
        if splits is None:
            print("no run record, so no evaluation split: int8 accuracy not measured")
        else:
            accuracy = compare_top1(
                {"fp32": output / ONNX_FILE, "int8": int8_path}, splits.evaluation, args.batch_size
            )
            report.int8.update(accuracy)
            print(
                f"top-1 on the run's evaluation split ({accuracy['num_images']} images): fp32 {accuracy['fp32_top1']:.2f}%, "
                f"int8 {accuracy['int8_top1']:.2f}%, agreement {accuracy['agreement']:.2f}%"
            )
    report.write(output)
    print(f"report: {output / REPORT_FILE}")
    return 0
