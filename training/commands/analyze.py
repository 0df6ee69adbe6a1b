"""`deit-distill analyze MODEL_OR_RUN [ARGS]`: look inside a student with a distillation token.

Prints, over the images of a dataset split, the cosine between the CLS and DIST token outputs at the embedding and
after every block, the cosine between the two heads' weights, and the agreement of each head (CLS, DIST, their
average) with the labels and the teacher, overall and per class, with the confusion between the heads
(`deit_distill.training.analysis`). The split is chosen as `eval` chooses it: a run directory defaults to its own evaluation
split and teacher; the data flags of `train` override it. `--json` prints the numbers as JSON; otherwise a table,
and a plot (`--plot PATH`, by default `analysis.png` in a run directory, or next to the model folder).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
)

from deit_distill.training.analysis import analyze_model, format_analysis, plot_analysis
from deit_distill.training.arguments import DataArguments
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.errors import UserError
from deit_distill.training.run_record import RunRecord
from deit_distill.training.trainer import DistillationTrainer
from deit_distill.training.transforms import build_eval_transform, with_image_transform

from .evaluate import AUGMENT_ON_HELP, HELP_GROUPS, _teacher, parse_model_command

USAGE = "deit-distill analyze MODEL_OR_RUN [--dataset_name ...] [--teacher T|none] [--json] [--plot PATH]"


@dataclass
class AnalyzeArguments:
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher to compare the heads with; a run's own teacher by default, 'none' for none."
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed of the held-out split and the subsets; a run's own by default."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    json: bool = field(default=False, metadata={"help": "Print the results as JSON (no plot unless --plot)."})
    plot: str | None = field(
        default=None, metadata={"help": "PNG path of the plot (default: analysis.png in a run directory)."}
    )
    augment_on: str | None = field(default=None, metadata={"help": AUGMENT_ON_HELP})


def run_analysis(
    model_path: str, data_args: DataArguments, analyze_args: AnalyzeArguments, seed: int
) -> dict[str, Any]:
    """The analysis of `deit_distill.training.analysis` over the split, with the teacher prepared as training prepares it."""
    model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True)
    if not getattr(model.config, "use_distillation_token", False):
        raise UserError(
            f"{model_path} has no distillation token (a plain ViT or another model): nothing to compare."
        )
    processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    dataset = data_args.load(seed=seed, unlabeled=False)
    names = dataset["validation"].features["label"].names
    if names != [model.config.id2label[i] for i in range(model.config.num_labels)]:
        raise UserError(
            f"The dataset's labels {names[:12]} differ from the model's; pass the model's dataset."
        )
    record = RunRecord.read(model_path) if RunRecord.exists(model_path) else None
    teacher = _teacher(analyze_args.teacher, record)
    with tempfile.TemporaryDirectory() as output_dir:
        # The trainer only prepares the teacher (input adapter, class order) and the eval loader, as `eval` does.
        trainer = DistillationTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                per_device_eval_batch_size=analyze_args.batch_size,
                report_to="none",
                remove_unused_columns=False,
                use_cpu=not torch.cuda.is_available(),
            ),
            teacher=teacher,
            data_collator=DistillationCollator(num_classes=len(names)),
            eval_dataset=with_image_transform(dataset["validation"], build_eval_transform(processor)),
            processing_class=processor,
        )
        batches = (trainer._prepare_inputs(batch) for batch in trainer.get_eval_dataloader())
        result = analyze_model(
            trainer.model, batches, names, trainer.teacher_logits if trainer.teacher is not None else None
        )
    result["teacher"] = teacher
    return result


def default_plot_path(model_path: str) -> str:
    path = Path(model_path)
    return str(
        path / "analysis.png" if RunRecord.exists(model_path) else path.parent / f"{path.name}_analysis.png"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = (("Analysis", AnalyzeArguments), HELP_GROUPS[1])
    description = __doc__.split(chr(10) * 2)[1]
    parsed = parse_model_command(argv, "analyze", USAGE, description, groups, AnalyzeArguments)
    if parsed is None:
        return 0
    model, data_args, analyze_args = parsed
    result = run_analysis(model, data_args, analyze_args, analyze_args.seed)
    plot = analyze_args.plot or (None if analyze_args.json else default_plot_path(model))
    if plot:
        plot_analysis(result, plot)
    if analyze_args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_analysis(result))
        print(f"\nplot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
