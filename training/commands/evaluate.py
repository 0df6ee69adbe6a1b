"""`deit-distill eval MODEL_OR_RUN [ARGS]`: top-1/top-5 of every head (and the teacher) on a dataset split.

A run directory is evaluated on exactly its own evaluation split (the dataset, splits, columns, subset sizes,
seed and held-out fraction its run record holds), with its teacher and loss, and the metrics come out as JSON
with the keys of its `eval_results.json`: it reproduces them. The data flags are those of `train` and override
the record; a model without a record (a Hub id, a converted folder) needs at least `--dataset_name`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
)

from deit_distill.training.arguments import DataArguments, check_data_arguments, dataclass_from_dict
from deit_distill.training.checkpoints import check_model_source
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.errors import MissingPathError, UserError
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.run_record import RunRecord
from deit_distill.training.trainer import DistillationTrainer
from deit_distill.training.transforms import build_eval_transform, with_image_transform

USAGE = "deit-distill eval MODEL_OR_RUN [--dataset_name ...] [--teacher T|none] [--seed S] [--batch_size N]"


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


def resolve_data(
    model: str, argv: list[str], data_args: DataArguments, seed: int | None
) -> tuple[DataArguments, int]:
    """The run's data arguments with the flags given on the command line on top, and the seed."""
    given = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    if not RunRecord.exists(model):
        if "dataset_name" not in given:
            raise UserError(
                f"{model} is not a training run of this project (no run record), so its data is unknown: pass "
                "--dataset_name (and the other data flags of `train` as needed)."
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
    teacher = _teacher(eval_args.teacher, record)
    loss = _loss(record, teacher)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=eval_args.batch_size,
            report_to="none",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
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
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            HfArgumentParser((DataArguments, EvalArguments)).print_help()
            return 0
        raise UserError(f"eval needs a model or run directory first: {USAGE}")
    model, rest = argv[0], argv[1:]
    check_model_source(model, "eval")
    data_args, eval_args = HfArgumentParser((DataArguments, EvalArguments)).parse_args_into_dataclasses(
        args=rest, look_for_args_file=False
    )
    if eval_args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {eval_args.batch_size}.")
    data_args, seed = resolve_data(model, rest, data_args, eval_args.seed)
    check_data_arguments(data_args)
    print(json.dumps(evaluate_model(model, data_args, eval_args, seed), indent=2))
    return 0
