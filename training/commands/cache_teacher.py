"""`deit-distill cache-teacher`: run the teacher once over every training view and store its outputs.

    deit-distill cache-teacher ARGS | recipe.json [ARGS] --teacher_cache DIR [--cache_epochs E] [--cache_top_k K]
    accelerate launch --config_file CONFIG -m deit_distill.training.commands.cache_teacher recipe.json [ARGS] --teacher_cache DIR

The arguments are `train`'s (a recipe included): the cache holds exactly the views a training run with them draws.
Train from it with the same arguments plus `--teacher_cache DIR` (see `deit_distill.training.teacher_cache`). Rerun the same
command after a kill to finish the cache; every process writes its own shards.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import transformers

from deit_distill.training.arguments import (
    check_cache_arguments,
    check_data_arguments,
    check_training_arguments,
)
from deit_distill.training.errors import Interrupted, UserError
from deit_distill.training.folder_lock import hold_folder
from deit_distill.training.models import build_model, check_model_arguments
from deit_distill.training.teacher import load_teacher_image_processor
from deit_distill.training.teacher_cache import describe_run, write_teacher_cache

from .train import build_trainer, load_data_once, parse_args, recorded_path

logger = logging.getLogger(__name__)


def run_cache_teacher(
    model_args, data_args, augmentation_args, distill_args, run_args, training_args, cache_args
) -> dict[str, Any]:
    """Data -> student layout and teacher (as `train` builds them) -> the cache; returns its metadata."""
    if not cache_args.teacher_cache:
        raise UserError("cache-teacher needs --teacher_cache DIR (the folder to write the cache to).")
    if not distill_args.teacher:
        raise UserError("cache-teacher needs --teacher (a run directory, a saved model or a Hub id).")
    if distill_args.distillation_type == "none":
        distill_args.distillation_type = (
            "hard"  # the cache serves any distillation type; "none" runs no teacher
        )
    check_data_arguments(data_args)
    check_training_arguments(model_args, augmentation_args, distill_args, training_args)
    check_model_arguments(model_args)
    check_cache_arguments(cache_args)
    # The cache folder is this command's while it writes (`deit_distill.training.folder_lock`).
    with hold_folder(
        cache_args.teacher_cache,
        "--teacher_cache",
        "deit-distill cache-teacher",
        is_main=training_args.process_index == 0,
    ):
        return _write_cache(model_args, data_args, augmentation_args, distill_args, training_args, cache_args)


def _write_cache(
    model_args, data_args, augmentation_args, distill_args, training_args, cache_args
) -> dict[str, Any]:
    transformers.set_seed(training_args.seed)
    training_args.remove_unused_columns = False  # the image column is consumed by our transform

    dataset = load_data_once(data_args, training_args)
    id2label = dict(enumerate(dataset["train"].features["label"].names))
    # The student decides the views (its image processor) and the trainer the batches: built as `train` does.
    built = build_model(model_args, id2label)
    trainer = build_trainer(built, dataset, augmentation_args, distill_args, training_args)
    run = describe_run(
        teacher=trainer.teacher,
        teacher_image_processor=load_teacher_image_processor(distill_args.teacher),
        student_image_processor=built.image_processor,
        labels=list(id2label.values()),
        train_dataset=dataset["train"],
        data_args=data_args,
        augmentation_args=augmentation_args,
        training_args=training_args,
        teacher_id=recorded_path(distill_args.teacher),  # usable from any working directory
    )
    metadata = write_teacher_cache(
        trainer,
        cache_args.teacher_cache,
        run,
        epochs=cache_args.cache_epochs,
        top_k=cache_args.cache_top_k,
        dtype=cache_args.cache_dtype,
        shard_views=cache_args.cache_shard_views,
    )
    storage = metadata["storage"]
    if trainer.is_world_process_zero():
        print(
            f"teacher cache {cache_args.teacher_cache}: {storage['epochs']} epoch(s) x "
            f"{storage['views_per_epoch']} views, top-{storage['top_k']} of {storage['num_classes']} classes "
            f"({storage['dtype']})"
        )
    return metadata


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    arguments = parse_args(argv, command="cache-teacher")
    try:
        run_cache_teacher(*arguments)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        cache = arguments[-1].teacher_cache
        raise Interrupted(
            f"interrupted; the teacher cache {cache} is incomplete (train refuses it): run the same command again "
            "to finish it, from the shards already written."
        ) from stop
    return 0


if __name__ == "__main__":  # `accelerate launch -m ...`: through the CLI, for its one-line errors
    from .cli import main as cli_main

    sys.exit(cli_main(["cache-teacher", *sys.argv[1:]]))
