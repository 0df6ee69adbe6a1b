"""What evaluation metrics cost: the Trainer's NumPy `compute_metrics` against the `evaluate` module, same inputs.

    python bench/metrics.py --examples 5000 --classes 1000 --repeats 3

Inputs are an ImageNet-sized validation pass: CLS, DIST and teacher logits (float32) and labels. Both compute the
same top-1/top-5 of every head and the agreement (tests/test_metric.py checks they are equal).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from transformers import EvalPrediction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deit_distill.training.evaluation import build_compute_metrics, load_deit_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((args.examples, args.classes), dtype=np.float32) for _ in range(3)]
    labels = rng.integers(0, args.classes, args.examples)
    numpy_metrics = build_compute_metrics(("cls", "dist", "teacher"))
    module = load_deit_accuracy(keep_in_memory=True)
    timings: dict[str, list[float]] = {"numpy (compute_metrics)": [], "evaluate module": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = numpy_metrics(EvalPrediction(predictions=tuple(logits), label_ids=labels))
        timings["numpy (compute_metrics)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        slow = module.compute(
            cls_logits=logits[0], distillation_logits=logits[1], teacher_logits=logits[2], references=labels
        )
        timings["evaluate module"].append(time.perf_counter() - start)
    assert fast == slow, (fast, slow)
    print(
        f"{args.examples} examples x {args.classes} classes x 3 heads, median of {args.repeats}, wall clock"
    )
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.3f} s |")


if __name__ == "__main__":
    main()
