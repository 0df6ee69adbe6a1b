"""The end-to-end demo on the embedded Fashion-MNIST, sized for a 2-core CPU.

1. trains a small convnet teacher (a transformers ResNet);
2. distils a DeiT student (CLS + DIST tokens, hard distillation, the paper's data recipe) and, as a baseline,
   trains the same student without a teacher on the same data, augmentation, epochs and seed;
3. evaluates every head against the teacher on the held-out split;
4. saves the distilled model with its processor and model card;
5. runs the image-classification pipeline (remote code) on a few test images;
6. prints a results table (also written to RESULTS.md in the output directory).

    deit-distill demo [--output_dir runs/demo] [--train_samples N] [--student_epochs E] ...

The runs are the recipes `training/recipes/fashion_mnist_teacher_cpu.json` and `fashion_mnist_cpu.json`, so the
demo's numbers can be reproduced with `deit-distill train RECIPE`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import pipeline

from deit_distill.training.commands.flags import DataclassParser
from deit_distill.training.commands.train import parse_args, run_training
from deit_distill.training.data import load_image_dataset
from deit_distill.training.device_augment import AUGMENT_ON
from deit_distill.training.errors import UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TEACHER_RECIPE = RECIPES / "fashion_mnist_teacher_cpu.json"
STUDENT_RECIPE = RECIPES / "fashion_mnist_cpu.json"


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo")
    train_samples: int | None = field(
        default=None, metadata={"help": "Labelled training images (recipe: 2000)."}
    )
    eval_samples: int | None = field(default=None, metadata={"help": "Held-out test images (recipe: 5000)."})
    teacher_epochs: int | None = field(default=None, metadata={"help": "Recipe: 40."})
    student_epochs: int | None = field(default=None, metadata={"help": "Recipe: 60."})
    seed: int = field(default=0)
    num_predict_images: int = field(default=4)
    augment_on: str = field(
        default="workers", metadata={"help": "Where the students' views are made: workers or device."}
    )


def _flags(demo: DemoArguments, name: str, epochs: int | None) -> list[str]:
    # The demo owns its output folder: a second demo replaces the first one's runs.
    flags = [
        "--output_dir",
        str(Path(demo.output_dir) / name),
        "--seed",
        str(demo.seed),
        "--overwrite_output_dir",
        "true",
    ]
    for flag, value in (
        ("--max_train_samples", demo.train_samples),
        ("--max_eval_samples", demo.eval_samples),
        ("--num_train_epochs", epochs),
        ("--augment_on", demo.augment_on if name.startswith("student") else None),
    ):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def run_demo(demo: DemoArguments) -> list[dict]:
    """The three runs of the Fashion-MNIST recipes, then the pipeline; returns one row of metrics per run."""
    output = Path(demo.output_dir)
    teacher_dir = output / "teacher"
    runs = [
        ("teacher", [str(TEACHER_RECIPE), *_flags(demo, "teacher", demo.teacher_epochs)]),
        (
            "student_distilled",
            [
                str(STUDENT_RECIPE),
                *_flags(demo, "student_distilled", demo.student_epochs),
                "--teacher",
                str(teacher_dir),
            ],
        ),
        (
            "student_baseline",
            [
                str(STUDENT_RECIPE),
                *_flags(demo, "student_baseline", demo.student_epochs),
                "--distillation_type",
                "none",
            ],
        ),
    ]
    rows = []
    for name, argv in runs:
        print(f"\n=== {name}: deit-distill train {' '.join(argv)} ===", flush=True)
        start = time.perf_counter()
        metrics = run_training(*parse_args(argv))
        rows.append({"name": name, **metrics, "wall_time_s": time.perf_counter() - start})
    predictions = predict_samples(output / "student_distilled", demo)
    write_results(output, rows, predictions)
    return rows


def predict_samples(model_dir: Path, demo: DemoArguments) -> list[str]:
    """Run the pipeline exactly as a user would: from the saved directory, with remote code."""
    images_dir = model_dir.parent / "sample_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    test = load_image_dataset("fashion_mnist", eval_subset=demo.num_predict_images, seed=demo.seed)[
        "validation"
    ]
    names = test.features["label"].names
    classifier = pipeline("image-classification", model=str(model_dir), trust_remote_code=True)
    lines = []
    for index, example in enumerate(test):
        path = images_dir / f"test_{index}.png"
        example["image"].save(path)
        top = classifier(str(path), top_k=1)[0]
        lines.append(
            f"{path.name}: true={names[example['label']]} predicted={top['label']} ({top['score']:.2f})"
        )
    return lines


def _pct(row: dict, key: str) -> str:
    value = row.get(f"eval_{key}")
    return "-" if value is None else f"{100 * value:.1f}"


def write_results(output: Path, rows: list[dict], predictions: list[str]) -> None:
    header = "| run | top-1 (avg) | top-1 CLS | top-1 DIST | teacher top-1 | agreement | wall time |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {_pct(row, 'avg_top1')} | {_pct(row, 'cls_top1')} | {_pct(row, 'dist_top1')} | "
            f"{_pct(row, 'teacher_top1')} | {_pct(row, 'agreement')} | {row['wall_time_s']:.0f} s |"
        )
    text = "\n".join(
        ["# deit-distill demo results", "", *lines, "", "Pipeline on test images:", "", *predictions, ""]
    )
    (output / "RESULTS.md").write_text(text)
    (output / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n" + text)


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    (demo,) = DataclassParser(DemoArguments, prog="deit-distill demo").parse_flags(
        list(sys.argv[1:] if argv is None else argv)
    )
    if demo.augment_on not in AUGMENT_ON:
        raise UserError(f"--augment_on must be one of {', '.join(AUGMENT_ON)}, got {demo.augment_on!r}.")
    return run_demo(demo)


if __name__ == "__main__":
    main()
