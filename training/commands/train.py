"""Train a DeiT student with a teacher (or a convnet teacher itself) on an image-classification dataset.

Runs as `python training/train.py ARGS`, `python training/train.py recipe.json`, `deit-distill train ...` or
`accelerate launch training/train.py ...`. Arguments are the dataclasses below plus `TrainingArguments`.

Example (the Fashion-MNIST CPU recipe)::

    deit-distill train training/recipes/fashion_mnist_cpu.json
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    TrainingArguments,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

if __package__ in (None, ""):  # `python training/train.py` and `accelerate launch training/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    build_image_processor,
)
from training.collator import DistillationCollator
from training.data import load_image_dataset, scan_images
from training.losses import DistillationLoss
from training.trainer import DistillationTrainer
from training.transforms import build_eval_transform, build_train_transform, with_image_transform

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "deit_distill_run.json"


@dataclass
class ModelArguments:
    architecture: str = field(
        default="deit_distill",
        metadata={
            "help": "'deit_distill' (the student) or 'resnet' (a convnet teacher, transformers ResNet)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to fine-tune (ours, or any AutoModelForImageClassification)."},
    )
    variant: str = field(default="tiny", metadata={"help": "DeiT variant: tiny, small or base."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config fields, e.g. 'hidden_size=96,num_hidden_layers=4,patch_size=4'."
        },
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Input resolution; resizes the position embedding of a checkpoint."}
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last block."})
    use_distillation_token: bool = field(default=True, metadata={"help": "False trains a plain ViT."})
    crop_pct: float = field(
        default=0.875, metadata={"help": "Eval resize = image_size / crop_pct, then crop."}
    )
    image_mean: str | None = field(default=None, metadata={"help": "Comma-separated; ImageNet's by default."})
    image_std: str | None = field(default=None, metadata={"help": "Comma-separated; ImageNet's by default."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "'fashion_mnist' (embedded), an imagefolder directory or a Hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train")
    eval_split: str | None = field(default=None, metadata={"help": "Defaults to validation/test if present."})
    image_column: str = field(default="image")
    label_column: str = field(default="label")
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Stratified subset of the train split."}
    )
    max_eval_samples: int | None = field(default=None)
    augmentation: str = field(default="deit", metadata={"help": "deit (the paper's), light or none."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha; 0 disables."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 disables."})
    mixup_prob: float = field(default=1.0)
    mixup_switch_prob: float = field(default=0.5)
    label_smoothing: float = field(default=0.1)
    repeated_augmentations: int = field(
        default=1, metadata={"help": "Copies of each image per epoch, each its own view (DeiT uses 3)."}
    )
    on_corrupt_image: str = field(
        default="raise", metadata={"help": "raise, or skip (and count) bad images."}
    )
    verify_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once before training, so a bad file fails (or is skipped) before the "
            "first step. Turn off for very large datasets: a bad image then raises an error naming its file "
            "when it is read. Skipping needs verification."
        },
    )


@dataclass
class DistillationArguments:
    teacher: str | None = field(default=None, metadata={"help": "Teacher model id or path."})
    distillation_type: str = field(default="hard", metadata={"help": "none, soft or hard."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation term."})
    tau: float = field(default=1.0, metadata={"help": "Temperature of soft distillation."})
    kl_reduction: str = field(default="numel", metadata={"help": "numel (official DeiT) or batchmean."})
    scale_lr: bool = field(
        default=False, metadata={"help": "lr = learning_rate * global_batch / 512 (the DeiT recipe)."}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay for fine-tuning, e.g. 0.65 (lr * decay**(L-i))."},
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, DistillationArguments, TrainingArguments]:
    """Parse `ARGS` or `recipe.json [ARGS]`; arguments after a recipe override its values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = recipe_to_argv(argv[0]) + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def recipe_to_argv(path: str | os.PathLike) -> list[str]:
    """A JSON recipe as command-line flags; keys starting with `_` are comments."""
    with open(path) as handle:
        recipe = json.load(handle)
    argv: list[str] = []
    for key, value in recipe.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):  # e.g. lr_scheduler_kwargs, parsed by TrainingArguments as JSON
            argv += [f"--{key}", json.dumps(value)]
        else:
            values = value if isinstance(value, list) else [value]
            argv += [f"--{key}", *(str(item) for item in values)]
    return argv


def _floats(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    return default if text is None else tuple(float(value) for value in text.split(","))


def _overrides(text: str | None) -> dict[str, Any]:
    """`"a=1,b=[2,3],c=gelu"` -> `{"a": 1, "b": [2, 3], "c": "gelu"}` (values are JSON when they parse)."""
    if not text:
        return {}
    values = {}
    # Split only at commas that start a new `key=`, so list values keep their commas.
    for item in re.split(r",(?=\s*\w+\s*=)", text):
        key, _, raw = item.partition("=")
        if not raw:
            raise ValueError(f"--config_overrides entries look like key=value, got {item!r}.")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            if "," in raw:
                raise ValueError(
                    f"--config_overrides: cannot parse {item!r}; separate entries as key=value,key=value."
                ) from None
            values[key.strip()] = raw.strip()
    return values


def build_model(model_args: ModelArguments, id2label: dict[int, str]) -> torch.nn.Module:
    """The student (or convnet teacher) for these labels, from scratch or from a checkpoint."""
    label_kwargs = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {name: index for index, name in id2label.items()},
    }
    overrides = _overrides(model_args.config_overrides)
    if model_args.architecture == "resnet":
        config = ResNetConfig(**{"layer_type": "basic", **overrides}, **label_kwargs)
        config.image_size = model_args.image_size or 224
        return ResNetForImageClassification(config)
    if model_args.architecture != "deit_distill":
        raise ValueError(
            f"--architecture must be 'deit_distill' or 'resnet', got {model_args.architecture!r}."
        )
    if model_args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            ignore_mismatched_sizes=True,
            attn_implementation=model_args.attn_implementation,
            drop_path_rate=model_args.drop_path_rate,
            **label_kwargs,
        )
        if not isinstance(model, DeiTDistillForImageClassification):
            raise ValueError(
                f"{model_args.model_name_or_path} is a {type(model).__name__}; convert it first with "
                "`deit-distill convert` (transformers DeiT/ViT and timm checkpoints are supported)."
            )
        if model_args.image_size and model_args.image_size != model.config.image_hw[0]:
            model.set_input_size(model_args.image_size)
        return model
    fields = {
        "drop_path_rate": model_args.drop_path_rate,
        "use_distillation_token": model_args.use_distillation_token,
        "inference_head": "average" if model_args.use_distillation_token else "cls",
        **({"image_size": model_args.image_size} if model_args.image_size else {}),
        **overrides,
        **label_kwargs,
    }
    config = DeiTDistillConfig.from_variant(model_args.variant, **fields)
    return DeiTDistillForImageClassification._from_config(
        config, attn_implementation=model_args.attn_implementation
    )


def scaled_learning_rate(training_args: TrainingArguments) -> float:
    """DeiT's linear scaling rule, from the actual world size and accumulation steps."""
    global_batch = (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )
    return training_args.learning_rate * global_batch / 512


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    distill_args: DistillationArguments,
    training_args: TrainingArguments,
) -> dict[str, float]:
    """Train, evaluate, save the model with its processor, run info and card; returns the final eval metrics."""
    transformers.set_seed(training_args.seed)
    logger.info(
        "Process %d of world_size=%d on %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
    )
    training_args.remove_unused_columns = False  # the image column is consumed by our transform
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push the finished run

    dataset = load_image_dataset(
        data_args.dataset_name,
        config_name=data_args.dataset_config,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        train_subset=data_args.max_train_samples,
        eval_subset=data_args.max_eval_samples,
        seed=training_args.seed,
    )
    if not data_args.verify_images and data_args.on_corrupt_image == "skip":
        raise ValueError(
            "--on_corrupt_image skip needs --verify_images true (bad images are found by the scan)."
        )
    for split in dataset if data_args.verify_images else ():
        dataset[split], skipped = scan_images(dataset[split], on_error=data_args.on_corrupt_image)
        if skipped:
            logger.warning("Skipped %d undecodable images in the %s split.", skipped, split)
    names = dataset["train"].features["label"].names
    id2label = dict(enumerate(names))

    model = build_model(model_args, id2label)
    processor = build_image_processor(
        model.config,
        crop_pct=model_args.crop_pct,
        image_mean=_floats(model_args.image_mean, IMAGENET_DEFAULT_MEAN),
        image_std=_floats(model_args.image_std, IMAGENET_DEFAULT_STD),
    )
    train_dataset = with_image_transform(
        dataset["train"], build_train_transform(processor, data_args.augmentation)
    )
    eval_dataset = with_image_transform(dataset["validation"], build_eval_transform(processor))

    if distill_args.scale_lr:
        training_args.learning_rate = scaled_learning_rate(training_args)
        logger.info("Scaled learning rate to %.3g", training_args.learning_rate)

    teacher = distill_args.teacher if distill_args.distillation_type != "none" else None
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        teacher=teacher,
        layer_decay=distill_args.layer_decay,
        distillation_loss=DistillationLoss(
            distillation_type=distill_args.distillation_type,
            alpha=distill_args.alpha,
            tau=distill_args.tau,
            kl_reduction=distill_args.kl_reduction,
            label_smoothing=data_args.label_smoothing,
        ),
        train_data_collator=DistillationCollator(
            num_classes=len(names),
            mixup_alpha=data_args.mixup,
            cutmix_alpha=data_args.cutmix,
            prob=data_args.mixup_prob,
            switch_prob=data_args.mixup_switch_prob,
            label_smoothing=data_args.label_smoothing,
        ),
        data_collator=DistillationCollator(num_classes=len(names)),
        repeated_augmentations=data_args.repeated_augmentations,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )

    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "auto", "last"):
        resume = True  # the newest complete checkpoint in output_dir
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    # The final evaluation is what the run reports (results table, model card), so it always runs.
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        write_run_info(training_args.output_dir, model, dataset, data_args, distill_args, training_args)
        from model_cards import write_model_card

        write_model_card(training_args.output_dir)
        if push_to_hub:
            from model_cards import push_run

            push_run(
                training_args.output_dir,
                repo_id=training_args.hub_model_id or Path(training_args.output_dir).name,
                token=training_args.hub_token,
                private=bool(training_args.hub_private_repo),
                revision=getattr(training_args, "hub_revision", None),
            )
    return metrics


def describe_hardware(training_args: TrainingArguments) -> str:
    if training_args.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(training_args.device)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{training_args.world_size} process(es) on {device}"


def write_run_info(
    output_dir: str,
    model: torch.nn.Module,
    dataset,
    data_args: DataArguments,
    distill_args: DistillationArguments,
    training_args: TrainingArguments,
) -> None:
    """What the model card and a reader need to know about this run, measured or configured, nothing guessed."""
    distilled = distill_args.distillation_type != "none"
    info = {
        "model": {
            "architecture": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        "data": {
            "dataset_name": data_args.dataset_name,
            "dataset_config": data_args.dataset_config,
            "train_split": data_args.train_split,
            "eval_split": data_args.eval_split or "validation",
            "num_train_examples": len(dataset["train"]),
            "num_eval_examples": len(dataset["validation"]),
            "augmentation": data_args.augmentation,
            "mixup": data_args.mixup,
            "cutmix": data_args.cutmix,
            "label_smoothing": data_args.label_smoothing,
        },
        "distillation": {
            "distillation_type": distill_args.distillation_type,
            "alpha": distill_args.alpha if distilled else None,
            "tau": distill_args.tau if distill_args.distillation_type == "soft" else None,
            "kl_reduction": distill_args.kl_reduction if distill_args.distillation_type == "soft" else None,
            "teacher": distill_args.teacher if distilled else None,
        },
        "training": {
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size,
            "global_batch_size": training_args.per_device_train_batch_size
            * training_args.world_size
            * training_args.gradient_accumulation_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "max_steps": training_args.max_steps,
            "weight_decay": training_args.weight_decay,
            "warmup_steps": training_args.warmup_steps,
            "lr_scheduler_type": getattr(
                training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type
            ),
            "optimizer": getattr(training_args.optim, "value", training_args.optim),
            "seed": training_args.seed,
            "mixed_precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        },
        "hardware": describe_hardware(training_args),
        "license": "apache-2.0",
    }
    with open(os.path.join(output_dir, RUN_INFO_FILE), "w") as handle:
        json.dump(info, handle, indent=2)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_training(*parse_args(argv))


if __name__ == "__main__":
    main()
