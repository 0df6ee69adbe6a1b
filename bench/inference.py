"""Inference throughput of DeiTDistill against transformers' DeiT-with-teacher and timm, with the same weights.

    python bench/inference.py --variants tiny small --batch-sizes 1 32 --repeats 7

Each timm `deit_*_distilled_patch16_224` is converted to ours (`from_timm`) and on to transformers
(`to_transformers_deit`), so all three run identical weights; their logits are checked before timing. The
implementations take turns inside every repeat (rotating who goes first), so slow drifts of a shared machine hit
all of them alike; the median repeat is reported. CPU runs fp32, CUDA (when present) bf16, all with sdpa.

On a shared machine, `--threads 1 --clock cpu` times the CPU time of the process instead of the wall clock, so
other jobs stealing cores do not show up as slowness (they still compete for caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch
import transformers

from deit_distill.modeling_deit_distill import from_timm, to_transformers_deit

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build_models(variant: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    reference = timm.create_model(f"deit_{variant}_distilled_patch16_224", pretrained=False).eval()
    ours = from_timm(reference)
    native = to_transformers_deit(ours)
    assert ours.config._attn_implementation == native.config._attn_implementation == "sdpa"
    models = {"ours": ours, "transformers": native, "timm": reference}
    return {name: model.to(device=device, dtype=dtype).eval() for name, model in models.items()}


def forward_fn(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "timm":
        return model
    return lambda pixels: model(pixel_values=pixels).logits


def check_same_logits(fns: dict[str, Callable], pixels: torch.Tensor, tolerance: float) -> None:
    logits = {name: fn(pixels).float() for name, fn in fns.items()}
    for name, value in logits.items():
        difference = (value - logits["ours"]).abs().max().item()
        if difference > tolerance:
            raise RuntimeError(
                f"{name} logits differ from ours by {difference:.2e}; the comparison is not fair."
            )


def time_call(fn: Callable, pixels: torch.Tensor, calls: int, device: torch.device, clock: Callable) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(calls):
        fn(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def measure(
    fns: dict[str, Callable],
    pixels: torch.Tensor,
    repeats: int,
    calls: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Images per second of each implementation: median over interleaved repeats of `calls` forwards."""
    batch = pixels.shape[0]
    for fn in fns.values():
        time_call(fn, pixels, max(1, calls // 2), device, clock)  # warm-up: allocator, kernels, caches
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(time_call(fns[name], pixels, calls, device, clock))
    return {name: batch * calls / statistics.median(values) for name, values in seconds.items()}


def benchmark_variant(
    variant: str,
    device: torch.device,
    batch_sizes: list[int],
    repeats: int,
    calls_for_batch: Callable[[int], int],
    clock: Callable[[], float] = time.perf_counter,
    extra_fns: Callable[[dict[str, torch.nn.Module]], dict[str, Callable]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per batch size: images/s of ours, transformers and timm with the same weights.

    fp32 on CPU, bf16 elsewhere; the logits are checked to agree before anything is timed. `extra_fns(models)`
    adds more implementations (e.g. ONNX Runtime sessions of ours) to the same interleaved timing; checking
    them is the caller's job.
    """
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    models = build_models(variant, device, dtype)
    fns = {name: forward_fn(name, model) for name, model in models.items()}
    with torch.inference_mode():
        check_same_logits(
            fns,
            torch.randn(2, 3, 224, 224, device=device, dtype=dtype),
            1e-4 if device.type == "cpu" else 0.1,
        )
    if extra_fns is not None:
        fns.update(extra_fns(models))
    with torch.inference_mode():
        for batch in batch_sizes:
            pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            rates = measure(fns, pixels, repeats, calls_for_batch(batch), device, clock)
            yield {
                "variant": variant,
                "device": device.type,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": batch,
                **{f"{name}_img_s": rate for name, rate in rates.items()},
                "ours_vs_fastest_peer": rates["ours"] / max(rates["transformers"], rates["timm"]),
            }


TABLE_HEADER = (
    "| variant | device | dtype | batch | ours img/s | transformers img/s | timm img/s | ours / fastest peer |\n"
    "|---|---|---|---:|---:|---:|---:|---:|"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"| {row['variant']} | {row['device']} | {row['dtype']} | {row['batch']} | {row['ours_img_s']:.1f} | "
        f"{row['transformers_img_s']:.1f} | {row['timm_img_s']:.1f} | {row['ours_vs_fastest_peer']:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7, help="Timed repeats per point (median reported).")
    parser.add_argument(
        "--images-per-repeat", type=int, default=32, help="Images per implementation per repeat."
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads.")
    parser.add_argument(
        "--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="'cpu' needs --threads 1.")
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.devices != ["cpu"]):
        # Several threads' CPU time includes spin-waiting, and GPU work is not CPU time.
        parser.error("--clock cpu needs --threads 1 --devices cpu")
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.clock} clock, "
        f"repeats {args.repeats}, {args.images_per_repeat} images per repeat\n"
    )
    print(TABLE_HEADER)
    for device_name in args.devices:
        device = torch.device(device_name)
        for variant in args.variants:
            rows = benchmark_variant(
                variant,
                device,
                args.batch_sizes,
                args.repeats,
                lambda batch: max(1, -(-args.images_per_repeat // batch)),
                CLOCKS[args.clock],
            )
            for row in rows:
                print(format_row(row), flush=True)


if __name__ == "__main__":
    main()
