"""`deit-distill train`: train a DeiT student with a teacher, or fine-tune any image classifier (e.g. a teacher).

    deit-distill train ARGS | recipe.json [ARGS]
    accelerate launch --config_file CONFIG training/train.py recipe.json [ARGS]

Arguments are the dataclasses of `deit_distill.training.arguments` plus `TrainingArguments`; flags after a recipe override it.
A run reads its data, builds its model, trains, evaluates, and writes the model with its image processor, the run
record, the metrics and the model card to `--output_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from deit_distill.training.arguments import (
    AugmentationArguments,
    DataArguments,
    DistillationArguments,
    ModelArguments,
    RunArguments,
    TeacherCacheArguments,
    check_cache_arguments,
    check_data_arguments,
    check_training_arguments,
    check_unlabeled_arguments,
)
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.data import count_unlabeled
from deit_distill.training.errors import UserError
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.models import BuiltModel, build_model
from deit_distill.training.run_record import RUN_RECORD_FILE, RunRecord, hub_dataset_id, hub_model_id
from deit_distill.training.teacher import load_teacher, load_teacher_image_processor
from deit_distill.training.teacher_cache import TeacherCache, open_for_run
from deit_distill.training.trainer import DistillationTrainer, last_complete_checkpoint
from deit_distill.training.transforms import build_eval_transform, build_train_transform, with_image_transform

logger = logging.getLogger(__name__)

ArgumentGroups = tuple[
    ModelArguments,
    DataArguments,
    AugmentationArguments,
    DistillationArguments,
    RunArguments,
    TrainingArguments,
    TeacherCacheArguments,
]
ARGUMENT_CLASSES = (
    ModelArguments,
    DataArguments,
    AugmentationArguments,
    DistillationArguments,
    RunArguments,
    TrainingArguments,
    TeacherCacheArguments,
)
# Files that mean a run finished in a folder (a later run would replace them).
_FINISHED_RUN_FILES = (RUN_RECORD_FILE, "config.json", "model.safetensors")


def parse_args(argv: list[str] | None = None) -> ArgumentGroups:
    """Parse `ARGS` or `recipe.json [ARGS]`; arguments after a recipe override its values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = recipe_to_argv(argv[0]) + argv[1:]
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def recipe_to_argv(path: str | os.PathLike) -> list[str]:
    """A JSON recipe as command-line flags; keys starting with `_` are comments."""
    if not os.path.isfile(path):
        raise UserError(f"recipe {path}: no such file.")
    try:
        with open(path) as handle:
            recipe = json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"recipe {path} is not valid JSON: {error}.") from None
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


def scaled_learning_rate(training_args: TrainingArguments) -> float:
    """DeiT's linear scaling rule, from the actual world size and accumulation steps."""
    return training_args.learning_rate * global_batch_size(training_args) / 512


def global_batch_size(training_args: TrainingArguments) -> int:
    return (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )


def prepare_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> None:
    """Refuse to replace a finished run or start over on an unfinished one unless asked; clear it when asked."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    resuming = training_args.resume_from_checkpoint not in (None, "", "false", "False")
    finished = [name for name in _FINISHED_RUN_FILES if (output_dir / name).exists()]
    checkpoints = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    if run_args.overwrite_output_dir:
        if training_args.process_index == 0:
            logger.warning("--overwrite_output_dir: removing the previous run in %s.", output_dir)
            shutil.rmtree(output_dir)
        return
    if resuming:
        return
    if finished:
        raise UserError(
            f"--output_dir {output_dir} holds a finished run ({', '.join(finished)}). Choose another --output_dir, "
            "or replace it with --overwrite_output_dir true."
        )
    if checkpoints:
        raise UserError(
            f"--output_dir {output_dir} holds checkpoints of an unfinished run ({', '.join(checkpoints)}). Resume "
            "it with --resume_from_checkpoint true, or start over with --overwrite_output_dir true."
        )


def build_trainer(
    built: BuiltModel,
    dataset: datasets.DatasetDict,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    training_args: TrainingArguments,
    teacher_cache: TeacherCache | None = None,
) -> DistillationTrainer:
    processor = built.image_processor
    num_classes = built.model.config.num_labels
    distilled = distill_args.distillation_type != "none"
    teacher, teacher_processor = None, None
    if distilled and teacher_cache is None:
        # Loaded here, before the Trainer creates anything in --output_dir, so a bad teacher fails cleanly.
        teacher_processor = load_teacher_image_processor(distill_args.teacher)
        teacher = load_teacher(distill_args.teacher)
    elif distill_args.teacher and not distilled:
        logger.info("--distillation_type none: the teacher %s is not used.", distill_args.teacher)
    return DistillationTrainer(
        model=built.model,
        args=training_args,
        teacher=teacher,
        teacher_image_processor=teacher_processor,
        teacher_cache=teacher_cache if distilled else None,
        distillation_loss=DistillationLoss(
            distillation_type=distill_args.distillation_type,
            alpha=distill_args.alpha,
            tau=distill_args.tau,
            kl_reduction=distill_args.kl_reduction,
            label_smoothing=augmentation_args.label_smoothing,
        ),
        train_data_collator=DistillationCollator(
            num_classes=num_classes,
            mixup_alpha=augmentation_args.mixup,
            cutmix_alpha=augmentation_args.cutmix,
            prob=augmentation_args.mixup_prob,
            switch_prob=augmentation_args.mixup_switch_prob,
            label_smoothing=augmentation_args.label_smoothing,
        ),
        data_collator=DistillationCollator(num_classes=num_classes),
        repeated_augmentations=augmentation_args.repeated_augmentations,
        layer_decay=distill_args.layer_decay,
        allow_loss_change=distill_args.allow_loss_change,
        train_dataset=with_image_transform(
            dataset["train"], build_train_transform(processor, augmentation_args.augmentation)
        ),
        eval_dataset=with_image_transform(dataset["validation"], build_eval_transform(processor)),
        processing_class=processor,
    )


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
    cache_args: TeacherCacheArguments | None = None,
) -> dict[str, float]:
    """Data -> model -> trainer -> train and evaluate -> publish; returns the final eval metrics."""
    cache_args = cache_args or TeacherCacheArguments()
    check_data_arguments(data_args)
    check_training_arguments(model_args, augmentation_args, distill_args, training_args, cache_args)
    check_unlabeled_arguments(data_args, distill_args)
    check_cache_arguments(cache_args)
    prepare_output_dir(training_args, run_args)
    transformers.set_seed(training_args.seed)
    logger.info(
        "Process %d of world_size=%d on %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
    )
    training_args.remove_unused_columns = False  # the image column is consumed by our transform
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push the finished run

    dataset = data_args.load(seed=training_args.seed)
    id2label = dict(enumerate(dataset["train"].features["label"].names))
    if data_args.unlabeled_dataset:
        unlabeled = count_unlabeled(dataset["train"])
        logger.info(
            "Training on %d labelled and %d unlabelled images (%.0f%% of each batch unlabelled on average).",
            len(dataset["train"]) - unlabeled,
            unlabeled,
            100 * unlabeled / len(dataset["train"]),
        )
    built = build_model(model_args, id2label)
    if distill_args.scale_lr:
        training_args.learning_rate = scaled_learning_rate(training_args)
        logger.info("Scaled learning rate to %.3g", training_args.learning_rate)
    cache = None
    if cache_args.teacher_cache and distill_args.distillation_type != "none":
        cache = open_for_run(
            cache_args.teacher_cache,
            cycle=cache_args.cache_cycle,
            teacher_id=distill_args.teacher,
            student_image_processor=built.image_processor,
            labels=list(id2label.values()),
            train_dataset=dataset["train"],
            data_args=data_args,
            augmentation_args=augmentation_args,
            training_args=training_args,
        )
        distill_args.teacher = distill_args.teacher or cache.teacher_id  # the run record names the teacher
    trainer = build_trainer(built, dataset, augmentation_args, distill_args, training_args, cache)

    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "auto", "last"):
        resume = True  # the newest complete checkpoint in output_dir
    elif resume is not None and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder (or use 'true').")
    if resume is True and last_complete_checkpoint(training_args.output_dir) is None:
        logger.warning(
            "No complete checkpoint in %s to resume from; starting from scratch.", training_args.output_dir
        )
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    # The final evaluation is what the run reports (results table, model card), so it always runs.
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        record = make_run_record(
            trainer, built, dataset, data_args, augmentation_args, distill_args, run_args
        )
        if cache is not None:
            record.distillation["teacher_cache"] = str(cache.directory)
        record.write(training_args.output_dir)
        publish(training_args, push_to_hub)
    return metrics


def publish(training_args: TrainingArguments, push_to_hub: bool) -> None:
    from deit_distill.model_cards import push_run, write_model_card

    write_model_card(training_args.output_dir)
    if push_to_hub:
        push_run(
            training_args.output_dir,
            repo_id=training_args.hub_model_id or Path(training_args.output_dir).name,
            token=training_args.hub_token,
            private=bool(training_args.hub_private_repo),
            revision=getattr(training_args, "hub_revision", None),
        )


def describe_hardware(training_args: TrainingArguments) -> str:
    if training_args.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(training_args.device)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{training_args.world_size} process(es) on {device}"


def make_run_record(
    trainer: DistillationTrainer,
    built: BuiltModel,
    dataset: datasets.DatasetDict,
    data_args: DataArguments,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    run_args: RunArguments,
) -> RunRecord:
    """What the card, `eval` and a reader need to know about this run, measured or configured, nothing guessed."""
    args: TrainingArguments = trainer.args
    model = built.model
    start = built.starting_point
    distilled = distill_args.distillation_type != "none"
    model_section: dict[str, Any] = {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "started_from": start.source if start else None,
        "start_format": start.kind if start else "scratch",
    }
    return RunRecord(
        model=model_section,
        data={
            **vars(data_args),
            "seed": args.seed,
            "eval_split_used": getattr(dataset, "eval_split_used", data_args.eval_split),
            "num_train_examples": len(dataset["train"]),
            "num_unlabeled_examples": count_unlabeled(dataset["train"])
            if data_args.unlabeled_dataset
            else None,
            "num_eval_examples": len(dataset["validation"]),
            **vars(augmentation_args),
        },
        distillation={
            "distillation_type": distill_args.distillation_type,
            "alpha": distill_args.alpha if distilled else None,
            "tau": distill_args.tau if distill_args.distillation_type == "soft" else None,
            "kl_reduction": distill_args.kl_reduction if distill_args.distillation_type == "soft" else None,
            "teacher": distill_args.teacher if distilled else None,
        },
        training={
            "learning_rate": args.learning_rate,
            "layer_decay": distill_args.layer_decay,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "global_batch_size": global_batch_size(args),
            # What was trained, not what was asked: a run stopped by --max_steps ends mid-epoch.
            "epochs": round(trainer.state.epoch or 0.0, 2),
            "steps": trainer.state.global_step,
            "weight_decay": args.weight_decay,
            "warmup_steps": args.warmup_steps,
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "optimizer": getattr(args.optim, "value", args.optim),
            "seed": args.seed,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        },
        card={
            "base_model": run_args.card_base_model or (start.hub_id if start else None),
            "dataset_id": run_args.card_dataset_id or hub_dataset_id(data_args.dataset_name),
            "teacher_id": run_args.card_teacher_id
            or (hub_model_id(distill_args.teacher) if distilled else None),
        },
        hardware=describe_hardware(args),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_training(*parse_args(argv))


if __name__ == "__main__":
    main()
