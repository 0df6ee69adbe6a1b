"""The end-to-end demo on the embedded Fashion-MNIST, sized for a 2-core CPU.

1. trains a small convnet teacher (a transformers ResNet);
2. distils a DeiT student (CLS + DIST tokens, hard distillation) and, as a baseline, trains the same student
   without a teacher on the same data, epochs and seed;
3. evaluates every head against the teacher on the held-out split;
4. saves the distilled model with its processor and model card;
5. runs the image-classification pipeline (remote code) on a few test images;
6. prints a results table (also written to RESULTS.md in the output directory).

    deit-distill demo [--output_dir runs/demo] [--train_samples N] [--student_epochs E] ...
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments, pipeline

from training.data import load_image_dataset
from training.train import DataArguments, DistillationArguments, ModelArguments, run_training

# Fashion-MNIST's own pixel statistics (greyscale replicated to RGB).
FASHION_MNIST_MEAN = "0.286,0.286,0.286"
FASHION_MNIST_STD = "0.353,0.353,0.353"


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo")
    train_samples: int = field(
        default=5000, metadata={"help": "Labelled training images (data-limited regime)."}
    )
    eval_samples: int = field(
        default=5000, metadata={"help": "Held-out test images used for every table row."}
    )
    teacher_epochs: int = field(default=15)
    student_epochs: int = field(default=25)
    batch_size: int = field(default=128)
    student_config: str = field(
        default="image_size=28,patch_size=7,hidden_size=96,num_hidden_layers=4,num_attention_heads=3",
        metadata={"help": "DeiT student fields (config_overrides syntax)."},
    )
    teacher_config: str = field(
        default="embedding_size=24,hidden_sizes=[32,64,128],depths=[1,1,1],downsample_in_first_stage=false",
        metadata={"help": "ResNet teacher fields (config_overrides syntax)."},
    )
    seed: int = field(default=0)
    num_predict_images: int = field(default=4)


def _training_args(demo: DemoArguments, name: str, epochs: int, learning_rate: float, weight_decay: float):
    return TrainingArguments(
        output_dir=str(Path(demo.output_dir) / name),
        num_train_epochs=epochs,
        per_device_train_batch_size=demo.batch_size,
        per_device_eval_batch_size=500,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=20,
        report_to="none",
        seed=demo.seed,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def _data_args(demo: DemoArguments, mix: bool) -> DataArguments:
    """Light crops and flips for everyone; the students add DeiT's Mixup/CutMix, the convnet teacher does not."""
    return DataArguments(
        dataset_name="fashion_mnist",
        max_train_samples=demo.train_samples,
        max_eval_samples=demo.eval_samples,
        augmentation="light",
        mixup=0.8 if mix else 0.0,
        cutmix=1.0 if mix else 0.0,
        label_smoothing=0.1,
    )


def _model_args(architecture: str, overrides: str) -> ModelArguments:
    return ModelArguments(
        architecture=architecture,
        config_overrides=overrides,
        image_size=28,
        crop_pct=1.0,
        image_mean=FASHION_MNIST_MEAN,
        image_std=FASHION_MNIST_STD,
        drop_path_rate=0.1,
    )


def run_demo(demo: DemoArguments) -> list[dict]:
    output = Path(demo.output_dir)
    rows = []

    def train(name: str, model_args, distill_args, epochs: int, learning_rate: float, weight_decay: float):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        data_args = _data_args(demo, mix=model_args.architecture == "deit_distill")
        training_args = _training_args(demo, name, epochs, learning_rate, weight_decay)
        metrics = run_training(model_args, data_args, distill_args, training_args)
        metrics["wall_time_s"] = time.perf_counter() - start
        rows.append({"name": name, **metrics})
        return metrics

    train(
        "teacher",
        _model_args("resnet", demo.teacher_config),
        DistillationArguments(distillation_type="none"),
        demo.teacher_epochs,
        3e-3,
        5e-4,
    )
    student = _model_args("deit_distill", demo.student_config)
    train(
        "student_distilled",
        student,
        DistillationArguments(teacher=str(output / "teacher"), distillation_type="hard", alpha=0.5),
        demo.student_epochs,
        2e-3,
        0.05,
    )
    train(
        "student_baseline",
        student,
        DistillationArguments(distillation_type="none"),
        demo.student_epochs,
        2e-3,
        0.05,
    )
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
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return run_demo(demo)


if __name__ == "__main__":
    main()
