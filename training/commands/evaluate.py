"""`deit-distill eval MODEL_OR_RUN [ARGS]`: top-1/top-5 of every head (and the teacher) on a dataset split.

A run directory is evaluated on exactly its own evaluation split (the dataset, splits, columns, subset sizes,
seed and held-out fraction its run record holds), with its teacher and loss, in its precision, and the metrics
come out as JSON with the keys of its `eval_results.json`: it reproduces them. A run trained from a teacher
cache was evaluated without a teacher, so it is here too unless `--teacher` names one. The data flags are those of `train` and override
the record; a model without a record (a Hub id, a converted folder) needs at least `--dataset_name`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
)

from deit_distill.training.arguments import DataArguments, check_data_arguments, dataclass_from_dict
from deit_distill.training.checkpoints import check_model_folder, check_model_source
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.device_augment import AUGMENT_ON
from deit_distill.training.errors import MissingPathError, UserError
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.run_record import RunRecord
from deit_distill.training.trainer import DistillationTrainer
from deit_distill.training.transforms import build_eval_transform, with_image_transform

from .flags import DataclassParser, dataclass_help

logger = logging.getLogger(__name__)
USAGE = (
    "deit-distill eval MODEL_OR_RUN [--dataset_name ...] [--teacher T|none] [--seed S] [--batch_size N] "
    "[--precision fp32|bf16|fp16]"
)


# `--augment_on` is accepted by eval and analyze as train takes it (a run's flags can be passed along); they see
# the eval transform either way, so it is only checked.
AUGMENT_ON_HELP = "workers or device, as in train; evaluation sees the eval transform either way."


def check_augment_on(value: str | None) -> None:
    if value is not None and value not in AUGMENT_ON:
        raise UserError(f"--augment_on must be one of {', '.join(AUGMENT_ON)}, got {value!r}.")


@dataclass
class EvalArguments:
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Also report the teacher and the agreement; a run's own teacher by default, 'none' for none."
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed of the held-out split and the subsets; a run's own by default."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    precision: str | None = field(
        default=None,
        metadata={"help": "fp32, bf16 or fp16 (a GPU's); a run's own mixed precision by default, else fp32."},
    )
    augment_on: str | None = field(default=None, metadata={"help": AUGMENT_ON_HELP})


HELP_GROUPS = (
    ("Evaluation", EvalArguments),
    ("Data (a run directory's own by default; these override it)", DataArguments),
)
# Data flags that only shape training: with eval or analyze they would do nothing.
TRAINING_ONLY = ("unlabeled_dataset", "unlabeled_split", "unlabeled_image_column", "max_unlabeled_samples")


def refuse_training_only_flags(argv: list[str], command: str) -> None:
    """`--unlabeled_dataset` and its flags add training images only; an evaluation takes none of them."""
    for token in argv:
        name = token[2:].split("=")[0].replace("-", "_") if token.startswith("--") else ""
        if name in TRAINING_ONLY:
            raise UserError(
                f"--{name} only adds unlabelled training images; {command} evaluates the labelled split alone, "
                "so leave it out."
            )


def parse_model_command(
    argv: list[str], command: str, usage: str, description: str, groups: tuple, arguments_class: type
) -> tuple[str, DataArguments, Any] | None:
    """`COMMAND MODEL [data flags] [command flags]` of eval and analyze, checked: the model, the data arguments (the
    run's own with the given flags on top) and the command's arguments, whose seed is resolved the same way.
    None when --help was asked for (and printed)."""
    if any(token in ("-h", "--help") for token in argv):
        print(dataclass_help(f"{usage}\n\n{description}", groups, TRAINING_ONLY))
        return None
    if not argv or argv[0].startswith("-"):
        raise UserError(f"{command} needs a model or run directory first: {usage}")
    model, rest = argv[0], argv[1:]
    data_args, command_args = DataclassParser((DataArguments, arguments_class)).parse_flags(rest)
    check_model_source(model, command)
    check_model_folder(model, command)
    refuse_training_only_flags(rest, command)
    check_augment_on(command_args.augment_on)
    if command_args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {command_args.batch_size}.")
    data_args, command_args.seed = resolve_data(model, rest, data_args, command_args.seed)
    check_data_arguments(data_args)
    return model, data_args, command_args


def resolve_data(
    model: str, argv: list[str], data_args: DataArguments, seed: int | None
) -> tuple[DataArguments, int]:
    """The run's data arguments with the flags given on the command line on top, and the seed."""
    given = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    if not RunRecord.exists(model):
        if "dataset_name" not in given:
            what = (
                f"{model} is not a training run of this project (no run record)"
                if os.path.exists(model)
                else f"{model}: no such folder here (read as a Hub model id, which holds no run record)"
            )
            raise UserError(
                f"{what}, so its data is unknown: check the path, or pass --dataset_name (and the other data "
                "flags of `train` as needed)."
            )
        return data_args, 0 if seed is None else seed
    record = RunRecord.read(model)
    recorded = record.data_arguments()
    overrides = {name: getattr(data_args, name) for name in given if hasattr(data_args, name)}
    merged = dataclass_from_dict(DataArguments, {**vars(recorded), **overrides})
    return merged, record.seed if seed is None else seed


def evaluate_model(
    model_path: str, data_args: DataArguments, eval_args: EvalArguments, seed: int
) -> dict[str, float]:
    """Every head's metrics (and the teacher's) on the evaluation split, through the model's saved processor."""
    model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    dataset = data_args.load(seed=seed, unlabeled=False)
    names = dataset["validation"].features["label"].names
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != model_names:
        raise UserError(
            f"The dataset's labels {names[:12]} differ from the model's {model_names[:12]}; evaluate on the "
            "dataset the model was trained for (--dataset_name, --label_column)."
        )
    record = RunRecord.read(model_path) if RunRecord.exists(model_path) else None
    if eval_args.teacher is None and record is not None and record.distillation.get("teacher_cache"):
        teacher = None  # trained from a cache: its evaluation ran no teacher, and this one reproduces it
    else:
        teacher = _teacher(eval_args.teacher, record)
    loss = _loss(record, teacher)
    precision = _precision(eval_args.precision, record)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=eval_args.batch_size,
            report_to="none",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            bf16=precision == "bf16",
            fp16=precision == "fp16",
        )
        trainer = DistillationTrainer(
            model=model,
            args=args,
            teacher=teacher,
            distillation_loss=loss,
            data_collator=DistillationCollator(num_classes=len(names)),
            eval_dataset=with_image_transform(dataset["validation"], build_eval_transform(processor)),
            processing_class=processor,
        )
        metrics = trainer.evaluate()
    # Set when a Trainer evaluates before training; a run's own eval_results.json has no such key.
    metrics.pop("eval_model_preparation_time", None)
    if record is not None and "epochs" in record.training:
        metrics["epoch"] = record.training["epochs"]
    return metrics


PRECISIONS = ("fp32", "bf16", "fp16")


def _precision(flag: str | None, record: RunRecord | None) -> str:
    """The precision to evaluate in: the flag's, else the run's own (as training evaluated), else fp32."""
    precision = flag or (record.training.get("mixed_precision") if record else None) or "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16" and not torch.cuda.is_available():
        if flag:
            raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine.")
        logger.warning("The run trained in fp16, which needs a CUDA GPU; evaluating in fp32 here.")
        return "fp32"
    return precision


def _teacher(flag: str | None, record: RunRecord | None) -> str | None:
    if flag is not None:
        return None if flag.lower() == "none" else flag
    teacher = record.distillation.get("teacher") if record else None
    if (
        teacher
        and not os.path.exists(teacher)
        and (teacher.startswith((".", "/")) or teacher.count("/") != 1)
    ):
        raise MissingPathError(
            f"The run's teacher {teacher} is not there any more: pass --teacher PATH, or --teacher none to "
            "evaluate the student alone."
        )
    return teacher


def _loss(record: RunRecord | None, teacher: str | None) -> DistillationLoss:
    """The run's own loss (so `eval_loss` reproduces), or plain cross-entropy (with the teacher's term if any)."""
    distillation = record.distillation if record else {}
    kind = distillation.get("distillation_type") or "none"
    if teacher is None:
        kind = "none"
    elif kind == "none":
        kind = "hard"
    return DistillationLoss(
        kind,
        alpha=distillation.get("alpha") or 0.5,
        tau=distillation.get("tau") or 1.0,
        kl_reduction=distillation.get("kl_reduction") or "numel",
        label_smoothing=(record.data.get("label_smoothing") or 0.0) if record else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    description = __doc__.split(chr(10) * 2)[1]
    parsed = parse_model_command(argv, "eval", USAGE, description, HELP_GROUPS, EvalArguments)
    if parsed is None:
        return 0
    model, data_args, eval_args = parsed
    print(json.dumps(evaluate_model(model, data_args, eval_args, eval_args.seed), indent=2))
    return 0
