"""ONNX export for CPU deployment: export, check against PyTorch, quantize to int8, measure the int8 cost.

`export_onnx` writes `model.onnx` (input `pixel_values` with a dynamic batch, output `logits`, the model's
inference head; optionally `cls_logits` and `distillation_logits` too) with the model's `config.json` and
`preprocessor_config.json`, so that `deit_distill.modeling_deit_distill.onnx_classifier.OnnxImageClassifier` runs it as the
pipeline runs the PyTorch model. Any image classifier this project saves works (DeiT with or without the
distillation token at any image size, a convnet teacher), since the export only calls the model's forward.

onnx, onnxscript (torch's ONNX exporter) and onnxruntime are the optional `onnx` extra; they are imported
where used, and their absence is a `UserError` saying what to install.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.image_processing_utils import BaseImageProcessor

from deit_distill.modeling_deit_distill.onnx_classifier import INPUT_NAME, ONNX_FILE, create_session

from .errors import UserError
from .output_files import OutputKind
from .run_record import EVAL_RESULTS_FILE, RUN_RECORD_FILE, TRAINER_STATE_FILE
from .transforms import ImageExamples, output_size

INT8_FILE = "model_int8.onnx"
REPORT_FILE = "onnx_export.json"
INSTALL_HINT = "pip install 'deit-distill[onnx]'"
HEAD_OUTPUTS = ("cls_logits", "distillation_logits")
# fp32 ONNX Runtime against PyTorch: |onnx - torch| <= TOLERANCE * (1 + |torch|), elementwise. Kernels differ in
# summation order only, which moved DeiT-Ti logits by under 1e-6 here; a wrong graph moves them by far more.
TOLERANCE = 1e-4
VERIFY_BATCH_SIZES = (1, 3)
INT8_MODES = ("dynamic", "static")
# What `deit-distill export` writes (the graphs, config.json, preprocessor_config.json, the report, the config's
# code file): a folder holding anything else is not replaced by `export --overwrite true`.
EXPORT_OUTPUT = OutputKind(
    command="export",
    what="an ONNX export",
    markers=(ONNX_FILE, REPORT_FILE),
    suffixes=(".onnx", ".json", ".py"),
    foreign=(RUN_RECORD_FILE, TRAINER_STATE_FILE, EVAL_RESULTS_FILE),
)


class OnnxMismatchError(UserError):
    """The exported graph does not compute what the PyTorch model computes (beyond `TOLERANCE`)."""


def require_onnx(modules: Sequence[str] = ("onnx", "onnxscript", "onnxruntime")) -> None:
    """Raise a `UserError` naming the install command when a module of the `onnx` extra is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(
                f"ONNX export and inference need the `onnx` extra ({module} is not installed): {INSTALL_HINT}."
            ) from error


@dataclass
class ExportReport:
    """What `deit-distill export` measured; written to `onnx_export.json` next to the files."""

    source: str
    outputs: list[str]
    input_shape: list[int]  # (channels, height, width); the batch dimension is dynamic
    tolerance: float = TOLERANCE
    max_difference: dict[str, float] = field(default_factory=dict)  # batch size -> max |onnx - torch|
    int8: dict[str, Any] = field(default_factory=dict)

    def write(self, output_dir: str | os.PathLike) -> Path:
        path = Path(output_dir) / REPORT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def exported_files(folder: str | os.PathLike) -> list[str] | None:
    """The ONNX files an export folder's `onnx_export.json` lists; `None` for a folder without a readable report
    (one made some other way, or by a version that wrote none)."""
    try:
        values = json.loads((Path(folder) / REPORT_FILE).read_text())
        int8 = values.get("int8") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return [ONNX_FILE, *([int8["file"]] if isinstance(int8, dict) and int8.get("file") else [])]


class _ExportedOutputs(nn.Module):
    """The model's forward as plain tensors: `logits`, then each head's logits when asked for."""

    def __init__(self, model: nn.Module, heads: bool) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values)
        if not self.heads:
            return (outputs.logits,)
        return (outputs.logits, *(outputs[name] for name in HEAD_OUTPUTS))


def output_names(model: nn.Module, heads: bool) -> list[str]:
    """The graph's outputs: `logits`, plus the CLS and DIST heads' when asked for and the model has them."""
    if heads and not getattr(model.config, "use_distillation_token", False):
        raise UserError(
            "--heads exports the CLS and DIST logits, but this model has no distillation token (one head only); "
            "drop --heads."
        )
    return ["logits", *(HEAD_OUTPUTS if heads else ())]


def input_shape(model: nn.Module, image_processor: BaseImageProcessor) -> tuple[int, int, int]:
    """`(channels, height, width)` the model receives from its saved image processor."""
    return (getattr(model.config, "num_channels", 3), *output_size(image_processor))


def export_onnx(
    model: nn.Module,
    image_processor: BaseImageProcessor,
    output_dir: str | os.PathLike,
    *,
    heads: bool = False,
    source: str = "",
) -> ExportReport:
    """Write `model.onnx`, `config.json` and `preprocessor_config.json` to `output_dir`, then check the graph
    against PyTorch at `VERIFY_BATCH_SIZES` (raises `OnnxMismatchError` beyond `TOLERANCE`)."""
    require_onnx()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = output_names(model, heads)
    shape = input_shape(model, image_processor)
    # Traced at batch 2: torch.export specialises a dimension of size 1, which would fix the batch.
    sample = torch.randn(2, *shape)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            _ExportedOutputs(model, heads).eval(),
            (sample,),
            str(output / ONNX_FILE),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,  # one self-contained file; the weights stay far below protobuf's 2 GB
            verbose=False,
        )
    model.config.save_pretrained(output)
    image_processor.save_pretrained(output)
    report = ExportReport(source=source, outputs=names, input_shape=list(shape))
    report.max_difference = verify_onnx(model, output / ONNX_FILE, heads=heads)
    return report


def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    *,
    heads: bool = False,
    batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    tolerance: float = TOLERANCE,
) -> dict[str, float]:
    """Largest |onnx - torch| over every output, per batch size, on random inputs; raises `OnnxMismatchError`
    when an element differs by more than `tolerance * (1 + |torch|)`."""
    session = create_session(onnx_path)
    shape = session.get_inputs()[0].shape[1:]
    generator = torch.Generator().manual_seed(0)
    differences = {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in _ExportedOutputs(model, heads).eval()(pixels)]
        actual = session.run(None, {INPUT_NAME: pixels.numpy()})
        worst = 0.0
        for name, want, got in zip(session.get_outputs(), expected, actual, strict=True):
            difference = np.abs(got - want)
            worst = max(worst, float(difference.max()))
            if (difference > tolerance * (1 + np.abs(want))).any():
                raise OnnxMismatchError(
                    f"{onnx_path}: output {name.name} differs from PyTorch by up to {float(difference.max()):.2e} "
                    f"at batch {batch}, beyond the tolerance {tolerance:g} x (1 + |logit|); the export is wrong."
                )
        differences[str(batch)] = worst
    return differences


def quantize_int8(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    mode: str = "dynamic",
    calibration: Iterable[np.ndarray] | None = None,
) -> Path:
    """Write an int8 copy of `onnx_path`.

    "dynamic": int8 weights, activations quantized per batch at run time (no data needed). "static": int8
    weights and activations in QDQ form, with activation ranges calibrated on `calibration` (batches of
    preprocessed `pixel_values`), per-channel weights.
    """
    require_onnx()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in INT8_MODES:
        raise UserError(f"int8 mode must be one of {', '.join(INT8_MODES)}, got {mode!r}.")
    if mode == "dynamic":
        with _quiet_root_logger():
            quantize_dynamic(str(onnx_path), str(output_path), weight_type=QuantType.QInt8)
        return Path(output_path)
    if calibration is None:
        raise UserError("Static int8 quantization needs calibration images: export a run directory.")

    class _Reader(CalibrationDataReader):
        def __init__(self, batches: Iterable[np.ndarray]) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with _quiet_root_logger():
        quantize_static(
            str(onnx_path),
            str(output_path),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # The matrix products hold nearly all the time; LayerNorm, Softmax and GELU stay fp32 for accuracy.
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        )
    return Path(output_path)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizer warns on the root logger to pre-process the model first; that measured under 4% faster
    # (docs/benchmarks.md), so the warning is noise to `export`'s users.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass
class RunSplits:
    """A run's evaluation split and a calibration sample of its training split, as model inputs."""

    evaluation: ImageExamples
    calibration: ImageExamples


def run_splits(
    run_dir: str | os.PathLike, image_processor: BaseImageProcessor, calibration_size: int
) -> RunSplits | None:
    """The run's own evaluation split (as `eval RUN_DIR` sees it) and `calibration_size` images drawn from its
    training split by the run's seed, through the eval transform of the saved processor; `None` when `run_dir`
    is no run."""
    from .run_record import RunRecord
    from .transforms import build_eval_transform, with_image_transform

    if not RunRecord.exists(run_dir):
        return None
    record = RunRecord.read(run_dir)
    dataset = record.data_arguments().load(seed=record.seed, unlabeled=False)
    transform = build_eval_transform(image_processor)
    train = dataset["train"]
    # Shuffled first: an imagefolder's rows come sorted by class.
    calibration = train.shuffle(seed=record.seed).select(range(min(calibration_size, len(train))))
    return RunSplits(
        evaluation=with_image_transform(dataset["validation"], transform),
        calibration=with_image_transform(calibration, transform),
    )


def pixel_batches(examples: ImageExamples, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(pixel_values, labels)` NumPy batches of a `with_image_transform` dataset, in order."""
    for start in range(0, len(examples), batch_size):
        rows = examples.__getitems__(list(range(start, min(start + batch_size, len(examples)))))
        yield (
            torch.stack([row["pixel_values"] for row in rows]).numpy(),
            np.array([row["labels"] for row in rows]),
        )


def compare_top1(
    onnx_paths: dict[str, str | os.PathLike], examples: ImageExamples, batch_size: int = 64
) -> dict[str, float]:
    """Top-1 (%) of each ONNX file on `examples`, and the share (%) of images where all predict the same class."""
    sessions = {name: create_session(path) for name, path in onnx_paths.items()}
    correct = dict.fromkeys(sessions, 0)
    agree = total = 0
    for pixels, labels in pixel_batches(examples, batch_size):
        predicted = {
            name: session.run(["logits"], {INPUT_NAME: pixels})[0].argmax(-1)
            for name, session in sessions.items()
        }
        for name, classes in predicted.items():
            correct[name] += int((classes == labels).sum())
        first, *others = predicted.values()
        agree += int(np.all([first == other for other in others], axis=0).sum()) if others else len(labels)
        total += len(labels)
    return {
        **{f"{name}_top1": 100 * correct[name] / total for name in sessions},
        "agreement": 100 * agree / total,
        "num_images": total,
    }
