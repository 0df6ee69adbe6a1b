"""`deit-distill predict MODEL PATH... [--top_k K] [--json]`: classify image files and folders (recursively).

Images are read exactly as training and the pipeline read them (EXIF orientation, every mode to RGB, 16-bit
rescaled). A file that is missing or not an image is reported on its own line and skipped; the others are still
classified, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from deit_distill.modeling_deit_distill import DeiTDistillImageClassificationPipeline
from deit_distill.training.checkpoints import check_model_folder, check_model_source
from deit_distill.training.errors import MissingPathError, UserError

from .flags import CommandParser, add_flag


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deit-distill predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a saved model folder or a Hub id")
    parser.add_argument("paths", nargs="+", help="image files, or folders searched recursively")
    add_flag(parser, "top_k", type=int, default=3, help="labels per image (default 3)")
    add_flag(parser, "json", action="store_true", help="one JSON object per image instead of text")
    add_flag(
        parser, "onnx", action="store_true", help="MODEL is an `export` folder: run it with ONNX Runtime"
    )
    add_flag(parser, "onnx_file", default="model.onnx", help="with --onnx: e.g. model_int8.onnx")
    return parser


def image_files(paths: list[str]) -> Iterator[str]:
    """Each path given, with folders expanded recursively to the files PIL can open (by extension), sorted."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                str(file)
                for file in Path(path).rglob("*")
                if file.is_file() and file.suffix.lower() in extensions
            )
            if not found:
                raise UserError(
                    f"{path} holds no image files (none with an extension PIL opens, such as .jpg or .png)."
                )
            yield from found
        else:
            yield path  # missing or unreadable files are reported when they are read


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {args.top_k}.")
    check_model_source(args.model, "predict")
    if args.onnx_file != "model.onnx" and not args.onnx:
        raise UserError(
            f"--onnx_file {args.onnx_file} is read only with --onnx: add --onnx, or leave it out."
        )
    if not args.onnx:
        check_model_folder(args.model, "predict")
    files = list(
        image_files(args.paths)
    )  # before the model loads: a folder without images is refused at once
    if args.onnx:
        classifier, config = _onnx_classifier(args.model, args.onnx_file)
    else:
        from transformers import pipeline

        # Our pipeline class whatever the folder says, so that older folders decode images as training does too.
        classifier = pipeline(
            "image-classification",
            model=args.model,
            trust_remote_code=True,
            pipeline_class=DeiTDistillImageClassificationPipeline,
        )
        config = classifier.model.config
    top_k = min(args.top_k, config.num_labels)
    failed = 0
    for path in files:
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            predictions = classifier(path, top_k=top_k)
            if any(math.isnan(prediction["score"]) for prediction in predictions):
                raise ValueError(
                    "the model's scores are NaN: its weights are damaged, or its training diverged"
                )
        except Exception as error:  # one bad image must not stop the others
            failed += 1
            reason = (
                f"cannot classify: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )
            if args.json:
                print(json.dumps({"file": path, "error": reason}), flush=True)
            else:
                print(f"{path}: error: {reason}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps({"file": path, "predictions": predictions}), flush=True)
        else:
            shown = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)
            print(f"{path}: {shown}", flush=True)
    if failed:
        print(f"deit-distill predict: {failed} file(s) could not be classified.", file=sys.stderr)
    return 1 if failed else 0


def _onnx_classifier(folder: str, file_name: str) -> tuple[Any, Any]:
    """The pipeline-shaped ONNX Runtime runner of an export folder, and its config."""
    from deit_distill.training.onnx_export import REPORT_FILE, exported_files, require_onnx

    require_onnx(["onnxruntime"])
    from deit_distill.modeling_deit_distill.onnx_classifier import OnnxImageClassifier

    listed = exported_files(folder)
    # A file the export's report does not list is not of this export (a copy, or left by an older version).
    if listed is not None and file_name not in listed:
        raise UserError(
            f"--onnx_file {file_name}: {folder}/{REPORT_FILE} lists {', '.join(listed)} only, so {file_name} is "
            "not of this export; choose one of those, or export again (--quantize int8 writes model_int8.onnx)."
        )
    if not os.path.isfile(os.path.join(folder, file_name)):
        raise MissingPathError(
            f"predict --onnx: {folder} has no {file_name}; write it with `deit-distill export`."
        )
    classifier = OnnxImageClassifier.from_pretrained(folder, file_name=file_name)
    return classifier, classifier.config
