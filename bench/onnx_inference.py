"""CPU inference: PyTorch (ours, transformers, timm) against ONNX Runtime fp32 and int8, in one interleaved run.

    python bench/onnx_inference.py --variants tiny small --batch-sizes 1 8 32 --threads 1 --clock cpu

`bench/inference.py`'s `benchmark_variant` builds the three PyTorch models with the same weights and checks their
logits; ours is then exported with `deit_distill.training.onnx_export.export_onnx` (which checks the graph against PyTorch),
quantized to int8 both ways (`dynamic`; `static`, calibrated here on random inputs, since only the speed is
measured: accuracy is `deit-distill export --quantize int8` on a trained run), and the ONNX Runtime sessions
join the PyTorch models in the same interleaved repeats. With `--threads 1` ONNX Runtime runs on the calling
thread, so `--clock cpu` times it as it times PyTorch. With more threads its workers spin between calls, as they
do by default in a deployed session (`--ort_spin off` stops that, at a cost in latency: it leaves the cores to
other thread pools, which matters on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
import transformers
from inference import CLOCKS, benchmark_variant

from deit_distill.modeling_deit_distill import build_image_processor
from deit_distill.modeling_deit_distill.onnx_classifier import INPUT_NAME, create_session
from deit_distill.training.onnx_export import export_onnx, quantize_int8

PYTORCH = ("ours", "transformers", "timm")
ONNX = ("ort_fp32", "ort_int8_dynamic", "ort_int8_static")


def onnx_fns(
    folder: Path, threads: int, spin: bool = True
) -> Callable[[dict[str, torch.nn.Module]], dict[str, Callable]]:
    """Export ours into `folder`, quantize it both ways, and return a forward function per session."""

    def build(models: dict[str, torch.nn.Module]) -> dict[str, Callable]:
        ours = models["ours"]
        export_onnx(ours, build_image_processor(ours.config), folder)
        rng = np.random.default_rng(0)
        calibration = (rng.standard_normal((8, 3, 224, 224), dtype=np.float32) for _ in range(4))
        files = {
            "ort_fp32": folder / "model.onnx",
            "ort_int8_dynamic": quantize_int8(folder / "model.onnx", folder / "dynamic.onnx", "dynamic"),
            "ort_int8_static": quantize_int8(
                folder / "model.onnx", folder / "static.onnx", "static", calibration
            ),
        }
        sessions = {name: create_session(path, threads, spin=spin) for name, path in files.items()}
        return {
            name: (lambda s: lambda pixels: s.run(None, {INPUT_NAME: pixels.numpy()})[0])(session)
            for name, session in sessions.items()
        }

    return build


TABLE_HEADER = (
    "| variant | batch | ours ms | transformers ms | timm ms | ORT fp32 ms | ORT int8 dyn. ms | ORT int8 static ms "
    "| ORT fp32 vs fastest PyTorch | int8 dyn. vs fastest PyTorch | int8 static vs fastest PyTorch |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row: dict) -> str:
    """Latency of one batch (ms) per implementation, and ONNX Runtime's speed-up over the fastest PyTorch."""
    ms = {name: 1000 * row["batch"] / row[f"{name}_img_s"] for name in (*PYTORCH, *ONNX)}
    fastest = min(ms[name] for name in PYTORCH)
    cells = [f"{ms[name]:.1f}" for name in (*PYTORCH, *ONNX)] + [
        f"{fastest / ms[name]:.2f}x" for name in ONNX
    ]
    return f"| {row['variant']} | {row['batch']} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per point (median reported).")
    parser.add_argument(
        "--images-per-repeat", type=int, default=32, help="Images per implementation per repeat."
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, for PyTorch and ONNX Runtime.")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="'cpu' needs --threads 1.")
    parser.add_argument(
        "--ort_spin",
        choices=("on", "off"),
        default="on",
        help="ONNX Runtime's workers busy-wait between calls (its default) or sleep.",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (several threads' CPU time includes spin-waiting)")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {args.clock} clock, ONNX Runtime spinning {args.ort_spin}, repeats {args.repeats}, "
        f"{args.images_per_repeat} images per repeat\n"
    )
    print(TABLE_HEADER)
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as folder:
            rows = benchmark_variant(
                variant,
                torch.device("cpu"),
                args.batch_sizes,
                args.repeats,
                lambda batch: max(1, -(-args.images_per_repeat // batch)),
                CLOCKS[args.clock],
                extra_fns=onnx_fns(Path(folder), args.threads, spin=args.ort_spin == "on"),
            )
            for row in rows:
                print(format_row(row), flush=True)


if __name__ == "__main__":
    main()
