"""`deit-distill train`: train a DeiT student with a teacher, or fine-tune any image classifier (e.g. a teacher).

    deit-distill train ARGS | recipe.json [ARGS]
    accelerate launch --config_file CONFIG training/train.py recipe.json [ARGS]

Arguments are the dataclasses of `deit_distill.training.arguments` plus `TrainingArguments`; flags after a recipe override it.
A run reads its data, builds its model, trains, evaluates, and writes the model with its image processor, the run
record, the metrics and the model card to `--output_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import typing
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import TrainingArguments

from deit_distill.training.arguments import (
    AugmentationArguments,
    DataArguments,
    DistillationArguments,
    ModelArguments,
    RunArguments,
    TeacherCacheArguments,
    check_cache_arguments,
    check_data_arguments,
    check_settings_take_effect,
    check_training_arguments,
    check_unlabeled_arguments,
)
from deit_distill.training.checkpoints import check_model_folder, read_json_file
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.data import count_unlabeled
from deit_distill.training.errors import Interrupted, UserError
from deit_distill.training.evaluation import AGREEMENT, HEADS, metric_key
from deit_distill.training.folder_lock import hold_folder
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.models import BuiltModel, build_model, check_model_arguments
from deit_distill.training.output_files import name_listing
from deit_distill.training.run_record import RUN_RECORD_FILE, RunRecord, hub_dataset_id, hub_model_id
from deit_distill.training.teacher import load_teacher, load_teacher_image_processor
from deit_distill.training.teacher_cache import TeacherCache, check_cache_files, open_for_run
from deit_distill.training.trainer import LOSS_SETTINGS_FILE, DistillationTrainer, last_complete_checkpoint
from deit_distill.training.transforms import (
    build_eval_transform,
    build_train_views,
    device_augment_spec_of,
    with_image_transform,
)

from .flags import DataclassParser, dataclass_help, format_flag, option_names, unknown_flag_message

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
# The parser's classes, in the order parse_args returns them.
ARGUMENT_CLASSES = typing.get_args(ArgumentGroups)
# Files that mean a run finished in a folder (a later run would replace them).
_FINISHED_RUN_FILES = (RUN_RECORD_FILE, "config.json", "model.safetensors")
# Files that only this project's runs write (with checkpoint-N folders): a folder holding none is not a run.
_RUN_MARKERS = (RUN_RECORD_FILE, LOSS_SETTINGS_FILE, "trainer_state.json")


def _visible_entries(folder: Path) -> list[Path]:
    """A folder's entries less hidden ones (a run's own lock, a `.git` of a cloned Hub repo), sorted."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def parse_args(argv: list[str] | None = None, command: str = "train") -> ArgumentGroups:
    """Parse `ARGS` or `recipe.json [ARGS]`; arguments after a recipe override its values.

    `--help` prints the project's flags by group and the most used Trainer flags, `--help_all` every flag; a
    misspelt flag, or a Trainer flag the project replaces or ignores, is one `UserError` line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = DataclassParser(ARGUMENT_CLASSES)
    if any(token in ("--help_all", "--help-all") for token in argv):
        parser.print_help()
        raise SystemExit(0)
    if any(token in ("-h", "--help") for token in argv):
        print(short_help(command))
        raise SystemExit(0)
    known = option_names(parser)
    if argv and argv[0].endswith(".json"):
        recipe = recipe_to_argv(argv[0], known)
        refuse_replaced_flags(recipe, f" (in the recipe {argv[0]})")
        argv = recipe + argv[1:]
    refuse_replaced_flags(argv)
    return parser.parse_flags(argv)


# Trainer flags that this project replaces, or that do nothing in it: refused, with what to use instead.
_TEXT_ONLY = "a text-model setting that does nothing for images"
_ONE_PUSH = "the finished run is pushed once, with its card (--push_to_hub true); push a run later with `deit-distill push`"
REPLACED_TRAINER_FLAGS = {
    "label_smoothing_factor": "use --label_smoothing (it also smooths the Mixup/CutMix targets)",
    "remove_unused_columns": "the image column is always consumed by the project's transforms",
    "label_names": "the labels come from --label_column",
    "do_train": "`train` always trains and then evaluates; evaluate a saved run with `deit-distill eval RUN_DIR`",
    "do_eval": "`train` always evaluates at the end (and as --eval_strategy says); see `deit-distill eval RUN_DIR`",
    "do_predict": "classify images with `deit-distill predict MODEL IMAGES`",
    "prediction_loss_only": "the evaluation needs every head's predictions for its accuracies",
    "hub_strategy": _ONE_PUSH,
    "hub_always_push": _ONE_PUSH,
    "train_sampling_strategy": "the project's sampler draws the training views (see --repeated_augmentations)",
    "length_column_name": _TEXT_ONLY,
    "average_tokens_across_devices": _TEXT_ONLY,
    "include_num_input_tokens_seen": _TEXT_ONLY,
    "neftune_noise_alpha": _TEXT_ONLY,
    "use_cache": _TEXT_ONLY,
    "debug": "`--debug` shows the traceback of an error here; the Trainer's TPU/underflow debugging is not offered",
}
# The Trainer flags `--help` shows, with what they do here; `--help_all` shows every one.
COMMON_TRAINER_FLAGS = {
    "output_dir": "Folder of the run: model, processor, run record, metrics, card, checkpoints.",
    "num_train_epochs": "Epochs to train.",
    "max_steps": "Optimizer steps to train; overrides --num_train_epochs when > 0.",
    "per_device_train_batch_size": "Training images per process and step (Mixup/CutMix need 2 or more).",
    "per_device_eval_batch_size": "Evaluation images per process and step.",
    "gradient_accumulation_steps": "Steps whose gradients add up to one optimizer step.",
    "learning_rate": "Peak learning rate (see --scale_lr).",
    "weight_decay": "AdamW weight decay.",
    "warmup_steps": "Linear warm-up steps (a float < 1: a share of the run).",
    "lr_scheduler_type": "linear, cosine, constant, ...",
    "optim": "Optimizer: adamw_torch_fused, adamw_torch, sgd, ...",
    "max_grad_norm": "Gradient clipping norm.",
    "seed": "Seed of the model, the views and the held-out split.",
    "bf16": "bfloat16 mixed precision.",
    "fp16": "float16 mixed precision.",
    "eval_strategy": "Evaluate during training: no, steps or epoch (the final evaluation always runs).",
    "eval_steps": "Steps between evaluations with --eval_strategy steps.",
    "save_strategy": "Checkpoints: no, steps or epoch.",
    "save_steps": "Steps between checkpoints with --save_strategy steps.",
    "save_total_limit": "Checkpoints to keep.",
    "logging_steps": "Steps between log lines.",
    "report_to": "none, tensorboard, wandb, ...",
    "resume_from_checkpoint": "A checkpoint folder, or true for the newest complete one in --output_dir.",
    "use_cpu": "Train on the CPU even when a GPU is there.",
    "dataloader_num_workers": "Processes that decode and augment images.",
    "torch_compile": "Compile the model with torch.compile.",
    "push_to_hub": "Push the finished run (model, processor, card) to the Hub.",
    "hub_model_id": "Repo id of --push_to_hub (default: the --output_dir folder name).",
}
_HELP_GROUPS = (
    ("Model", ModelArguments),
    ("Data", DataArguments),
    ("Augmentation", AugmentationArguments),
    ("Distillation", DistillationArguments),
    ("Teacher cache", TeacherCacheArguments),
    ("Run", RunArguments),
)


def refuse_replaced_flags(argv: list[str], where: str = "") -> None:
    """A Trainer flag the project replaces or ignores is an error naming what to use, never silently dropped."""
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=")[0].replace("-", "_")
        name = name[3:] if name.startswith("no_") and name[3:] in REPLACED_TRAINER_FLAGS else name
        if name in REPLACED_TRAINER_FLAGS:
            raise UserError(f"--{name}{where} is not used by deit-distill: {REPLACED_TRAINER_FLAGS[name]}.")


def short_help(command: str = "train") -> str:
    """The project's flags by group, each with its help, then the most used Trainer flags."""
    usage = (
        f"usage: deit-distill {command} [recipe.json] [--flag VALUE ...]   (flags after a recipe override it)\n"
        "Every flag is also accepted as --foo-bar. `--help_all` lists every flag, the Trainer's included."
    )
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainingArguments)}
    lines = [
        dataclass_help(usage, _HELP_GROUPS),
        "\nTraining (transformers' TrainingArguments, the most used; --help_all for all of them):",
    ]
    for name, help_text in COMMON_TRAINER_FLAGS.items():
        default = getattr(defaults[name], "value", defaults[name])
        lines.append(format_flag(name, help_text, None if name == "output_dir" else default))
    return "\n".join(lines)


def recipe_to_argv(path: str | os.PathLike, known: list[str] | None = None) -> list[str]:
    """A JSON recipe as command-line flags; keys starting with `_` are comments. With `known` (the parser's
    flags), an unknown key is an error naming the recipe and the nearest flag."""
    if not os.path.isfile(path):
        raise UserError(f"recipe {path}: no such file.")
    recipe = read_json_file(path, "recipe")
    argv: list[str] = []
    for key, value in recipe.items():
        if key.startswith("_"):
            continue
        if known is not None and f"--{key.replace('-', '_')}" not in known:
            raise UserError(unknown_flag_message(key, known, f" in the recipe {path}"))
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


def clear_output_dir(training_args: TrainingArguments, remove: bool) -> None:
    """Remove the previous run in `--output_dir` when `check_output_dir` said so, just before the Trainer.

    Called once the data, model and teacher are known to load, so a mistake in any of them never costs the user
    the run they asked to replace. Every process calls it: process 0 alone removes, and none goes on before the
    removal is done (the Trainer creates files in the folder from its constructor on).
    """
    if remove and training_args.process_index == 0:
        logger.warning("--overwrite_output_dir: removing the previous run in %s.", training_args.output_dir)
        for path in _visible_entries(Path(training_args.output_dir)):  # hidden ones (the lock, a .git) stay
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    PartialState().wait_for_everyone()


def check_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> bool:
    """Whether `--output_dir` is to be removed; raises when it holds a run that must not be replaced.

    Every process calls it before any work, so all refuse alike and early.
    """
    output_dir = Path(training_args.output_dir)
    entries = _visible_entries(output_dir) if output_dir.is_dir() else []
    if not entries:
        return False
    if not any((output_dir / name).exists() for name in _RUN_MARKERS) and not any(
        output_dir.glob("checkpoint-*")
    ):
        # Not a run: a run's files (config.json, README.md, ...) would land among the user's, and
        # --overwrite_output_dir would delete them.
        shown = name_listing([path.name + ("/" if path.is_dir() else "") for path in entries], limit=5)
        raise UserError(
            f"--output_dir {output_dir} holds files that are not a deit-distill run ({shown}); a run is "
            "written to a new or empty folder (and --overwrite_output_dir replaces only a previous run): choose "
            "another --output_dir."
        )
    resuming = training_args.resume_from_checkpoint not in (None, "", "false", "False")
    finished = [name for name in _FINISHED_RUN_FILES if (output_dir / name).exists()]
    checkpoints = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    if run_args.overwrite_output_dir:
        return True
    if resuming:
        check_resume_has_steps_left(training_args)
        return False
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
    return False


def check_resume_has_steps_left(training_args: TrainingArguments) -> None:
    """Resuming a checkpoint that already reached the run's length would train nothing and still rewrite the run's
    model, metrics and card: refuse it, saying how to train further."""
    resume = str(training_args.resume_from_checkpoint)
    if resume.lower() in ("true", "auto", "last"):
        checkpoint = last_complete_checkpoint(training_args.output_dir)
    else:
        checkpoint = resume if os.path.isdir(resume) else None
    state_file = Path(checkpoint or "", "trainer_state.json")
    if checkpoint is None or not state_file.is_file():
        return  # nothing to resume, or not ours to read: said later
    state = read_json_file(state_file, "--resume_from_checkpoint")
    step, epoch = state.get("global_step", 0), state.get("epoch") or 0.0
    if training_args.max_steps > 0:
        done, length, flag = step >= training_args.max_steps, training_args.max_steps, "--max_steps"
    else:
        done, length, flag = (
            epoch >= training_args.num_train_epochs - 1e-9,
            training_args.num_train_epochs,
            "--num_train_epochs",
        )
    if done:
        raise UserError(
            f"--resume_from_checkpoint: {checkpoint} is at step {step} (epoch {epoch:g}), which {flag} {length:g} "
            f"does not go beyond: nothing is left to train. Raise {flag} to train further."
        )


def load_data_once(data_args: DataArguments, training_args: TrainingArguments) -> datasets.DatasetDict:
    """The run's data, prepared by the main process first: it downloads, converts and caches (an imagefolder's
    Arrow files, the split's indices), the others then load that cache instead of all doing the work at once."""
    with training_args.main_process_first(desc="preparing the dataset"):
        return data_args.load(seed=training_args.seed)


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
    device_spec = None
    if augmentation_args.augment_on == "device" and augmentation_args.augmentation != "none":
        device_spec = device_augment_spec_of(processor, augmentation_args.augmentation)
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
            device_augment=device_spec,
        ),
        data_collator=DistillationCollator(num_classes=num_classes),
        repeated_augmentations=augmentation_args.repeated_augmentations,
        layer_decay=distill_args.layer_decay,
        allow_loss_change=distill_args.allow_loss_change,
        train_dataset=with_image_transform(
            dataset["train"],
            build_train_views(processor, augmentation_args.augmentation, augmentation_args.augment_on),
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
    """Data -> model -> trainer -> train and evaluate -> publish; returns the final eval metrics.

    The run holds `--output_dir` (`deit_distill.training.folder_lock`) from before anything is written or
    deleted there until it ends, however it ends.
    """
    cache_args = cache_args or TeacherCacheArguments()
    check_data_arguments(data_args)
    check_training_arguments(model_args, augmentation_args, distill_args, training_args, cache_args)
    check_model_arguments(model_args)
    check_unlabeled_arguments(data_args, distill_args)
    check_cache_arguments(cache_args)
    check_settings_take_effect(
        model_args, augmentation_args, distill_args, run_args, training_args, cache_args
    )
    # Damaged files or a model of the wrong kind, named before the data is read or anything is written.
    if model_args.model_name_or_path:
        check_model_folder(model_args.model_name_or_path, "--model_name_or_path", state_dict_file=True)
    if distill_args.teacher and distill_args.distillation_type != "none":
        check_model_folder(distill_args.teacher, "--teacher")
    if cache_args.teacher_cache and distill_args.distillation_type != "none":
        check_cache_files(cache_args.teacher_cache)
    with hold_folder(
        training_args.output_dir,
        "--output_dir",
        "deit-distill train",
        is_main=training_args.process_index == 0,
    ):
        return _train(
            model_args, data_args, augmentation_args, distill_args, run_args, training_args, cache_args
        )


def _train(
    model_args: ModelArguments,
    data_args: DataArguments,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
    cache_args: TeacherCacheArguments,
) -> dict[str, float]:
    remove_previous_run = check_output_dir(training_args, run_args)
    transformers.set_seed(training_args.seed)
    logger.info(
        "Process %d of world_size=%d on %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
    )
    training_args.remove_unused_columns = False  # the image column is consumed by our transform
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push the finished run

    dataset = load_data_once(data_args, training_args)
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
    clear_output_dir(training_args, remove_previous_run)
    trainer = build_trainer(built, dataset, augmentation_args, distill_args, training_args, cache)

    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "auto", "last"):
        resume = True  # the newest complete checkpoint in output_dir
    elif resume is not None and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder (or use 'true').")
    # With no complete checkpoint, `DistillationTrainer.train` says it starts from scratch.
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
            record.distillation["teacher_cache"] = recorded_path(str(cache.directory))
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


def recorded_path(name: str | None) -> str | None:
    """A local path as an absolute one, so that `eval RUN_DIR` finds it from any working directory; a Hub id (or
    `fashion_mnist`), which is not a local path, as it is."""
    if not name or not os.path.exists(os.path.expanduser(name)):
        return name
    return str(Path(name).expanduser().resolve())


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
        "started_from": recorded_path(start.source) if start else None,
        "start_format": start.kind if start else "scratch",
    }
    return RunRecord(
        model=model_section,
        data={
            **vars(data_args),
            "dataset_name": recorded_path(data_args.dataset_name),
            "unlabeled_dataset": recorded_path(data_args.unlabeled_dataset),
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
            "teacher": recorded_path(distill_args.teacher) if distilled else None,
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


def format_final_evaluation(metrics: dict[str, float], output_dir: str) -> str:
    """The final evaluation as a short table: top-1/top-5 of every head present, and the eval loss.

    With fewer than 5 classes the second column is top-k for k = the number of classes, as the metrics are.
    """
    k = max((k for k in range(2, 6) for head in HEADS if metric_key(head, k, "eval_") in metrics), default=5)
    rows = [
        f"final evaluation ({output_dir}/eval_results.json):",
        f"  {'head':<8}{'top-1':>8}{f'top-{k}':>8}",
    ]
    for head in HEADS:
        top1, topk = metrics.get(metric_key(head, 1, "eval_")), metrics.get(metric_key(head, k, "eval_"))
        if top1 is not None:
            rows.append(f"  {head:<8}{100 * top1:8.2f}" + ("" if topk is None else f"{100 * topk:8.2f}"))
    if f"eval_{AGREEMENT}" in metrics:  # the share of images where the student's top-1 is the teacher's
        rows.append(f"  student-teacher agreement {100 * metrics[f'eval_{AGREEMENT}']:.2f}")
    if "eval_loss" in metrics:
        rows.append(f"  eval loss {metrics['eval_loss']:.4f}")
    return "\n".join(rows)


def interrupted_message(output_dir: str) -> str:
    """What a Ctrl-C left in `--output_dir`, and how to go on."""
    checkpoint = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if checkpoint is None:
        return f"interrupted; no checkpoint was saved in {output_dir}, so the run cannot be resumed."
    return f"interrupted; checkpoint at {checkpoint}: resume with the same command and --resume_from_checkpoint true."


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    arguments = parse_args(argv)
    training_args = arguments[5]
    try:
        metrics = run_training(*arguments)
    except (
        KeyboardInterrupt
    ) as stop:  # Ctrl-C, or SIGTERM (errors.Terminated), whose exit status the CLI keeps
        raise Interrupted(interrupted_message(training_args.output_dir)) from stop
    if training_args.process_index == 0:
        print(format_final_evaluation(metrics, training_args.output_dir), flush=True)
    return metrics


if __name__ == "__main__":  # `accelerate launch -m ...`: through the CLI, for its one-line errors
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
