"""Evaluate a saved model (every head, and optionally a teacher) on a dataset split: `deit-distill eval`."""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainingArguments

from .collator import DistillationCollator
from .data import load_image_dataset
from .losses import DistillationLoss
from .trainer import DistillationTrainer
from .transforms import build_eval_transform, with_image_transform


def evaluate_model(
    model_name_or_path: str,
    *,
    dataset_name: str = "fashion_mnist",
    dataset_config: str | None = None,
    eval_split: str | None = None,
    max_eval_samples: int | None = None,
    teacher: str | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Top-1/top-5 of every head of a saved model (and of the teacher, with agreement) on a dataset split.

    The images go through the model's own saved image processor, exactly as in the pipeline.
    """
    model = AutoModelForImageClassification.from_pretrained(model_name_or_path, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
    dataset = load_image_dataset(
        dataset_name, config_name=dataset_config, eval_split=eval_split, eval_subset=max_eval_samples
    )
    names = dataset["validation"].features["label"].names
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != model_names:
        raise ValueError(
            f"The dataset's labels {names[:12]} differ from the model's {model_names[:12]}; evaluate on the "
            "dataset the model was trained for."
        )
    eval_dataset = with_image_transform(dataset["validation"], build_eval_transform(processor))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = DistillationTrainer(
            model=model,
            args=args,
            teacher=teacher,
            distillation_loss=DistillationLoss("hard" if teacher else "none"),
            data_collator=DistillationCollator(num_classes=len(names)),
            eval_dataset=eval_dataset,
            processing_class=processor,
        )
        return trainer.evaluate()
