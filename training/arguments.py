"""The command-line arguments, defined once and shared by every command (`train`, `eval`, `cache-teacher`, ...).

Each group is a dataclass parsed by `HfArgumentParser` (so `--foo_bar` and `--foo-bar` both work). `check_*`
functions reject out-of-range values before anything is loaded or written, naming the flag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import datasets

from .data import (
    TABLE_BUILDERS,
    CorruptImageError,
    load_image_dataset,
    load_unlabeled_images,
    random_subset,
    scan_splits,
    source_kind,
    with_unlabeled,
)
from .device_augment import AUGMENT_ON
from .errors import MissingPathError, UserError
from .folder_lock import check_folder_path
from .transforms import TRAIN_PRESETS

DISTILLATION_TYPES = ("none", "soft", "hard")
logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to start from: this project's, transformers' DeiT/ViT, timm deit_*/vit_* (a "
            "timm/... id, a Hugging Face-layout folder or a state-dict file) for a student; any other "
            "AutoModelForImageClassification (ResNet, ConvNeXt, RegNet, Swin, ...) or timm model is fine-tuned "
            "as it is, e.g. a teacher. A new label set re-initialises the heads."
        },
    )
    architecture: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: 'deit_distill' (the student, the default) or 'resnet' (a small convnet "
            "teacher, transformers ResNet). With --model_name_or_path, leave it unset (the checkpoint decides) "
            "or set 'deit_distill' to require a DeiT/ViT student."
        },
    )
    variant: str = field(default="tiny", metadata={"help": "DeiT variant from scratch: tiny, small or base."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config fields, e.g. 'hidden_size=96,num_hidden_layers=4,patch_size=4'."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution; resizes a DeiT checkpoint's position embedding."},
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth of the last block: 0.1 for DeiT students by default; for a pretrained "
            "model, its own value unless set (an error for models without drop path)."
        },
    )
    use_distillation_token: bool = field(
        default=True, metadata={"help": "False trains a plain ViT (from scratch)."}
    )
    crop_pct: float | None = field(
        default=None,
        metadata={
            "help": "Eval resize = image_size / crop_pct, then crop (0.875 from scratch; a checkpoint keeps "
            "its image processor's)."
        },
    )
    image_mean: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated; ImageNet's from scratch, the checkpoint's processor's otherwise."
        },
    )
    image_std: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated; ImageNet's from scratch, the checkpoint's processor's otherwise."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa, flash_attention_2, ...; the model's default (sdpa) when unset."},
    )


@dataclass
class DataArguments:
    """Where the data comes from: recorded with every run, so `eval RUN_DIR` sees exactly the run's split."""

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={
            "help": "'fashion_mnist' (embedded); a folder of images, one sub-folder per class; a .csv, .tsv, "
            ".json, .jsonl or .parquet file, or a folder of them (train/validation/test files named by split), whose "
            "image column holds paths (relative to the file's folder) or image bytes; a save_to_disk folder; "
            "or a Hub dataset id."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Defaults to validation/valid/val/test if present, else a held-out part of train."},
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of images, image bytes or image paths; by default the obvious one (image, img, path, "
            "file, ...)."
        },
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of class names (any string type) or class indices; by default the obvious one "
            "(label, labels, class, category, ...)."
        },
    )
    allow_classes_without_training_images: bool = field(
        default=False,
        metadata={
            "help": "Keep classes of the label list that have no training image (an empty class folder, one "
            "emptied by --max_train_samples or --on_corrupt_image skip), with a warning; otherwise they are refused, "
            "since their outputs would never train. An eval label that is not in the list at all is always refused."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Stratified subset of the train split, fixed by the seed."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Stratified subset of the eval split, fixed by the seed."}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train held out for evaluation when the dataset has no eval split."},
    )
    on_corrupt_image: str = field(
        default="raise",
        metadata={
            "help": "raise: a bad image stops the run with an error naming its file (when it is read, or by "
            "--verify_images); skip: decode every image once before training (a scan, as --verify_images) and "
            "drop and count the bad ones."
        },
    )
    verify_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image once before training, so a bad file fails before the first step (this "
            "reads the whole dataset). Off by default: a bad image raises an error naming its file when it is "
            "read."
        },
    )

    unlabeled_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Images without labels that train through the distillation term alone (the teacher labels "
            "them; the label term is masked): a folder of images (sub-folder names are ignored), "
            "'fashion_mnist' or a Hub id. The training data's own dataset and split means its rows outside "
            "--max_train_samples. They join the labelled images in the same shuffled batches, so about "
            "unlabelled / (labelled + unlabelled) of every batch is unlabelled; set the ratio with "
            "--max_unlabeled_samples."
        },
    )
    unlabeled_split: str = field(default="train", metadata={"help": "Split of --unlabeled_dataset."})
    unlabeled_image_column: str | None = field(
        default=None, metadata={"help": "Image column of --unlabeled_dataset (by default the obvious one)."}
    )
    max_unlabeled_samples: int | None = field(
        default=None, metadata={"help": "Random subset of the unlabelled images, fixed by the seed."}
    )

    def load(
        self, seed: int, cache_dir: str | None = None, *, unlabeled: bool = True
    ) -> datasets.DatasetDict:
        """The "train" and "validation" splits these arguments describe (held-out split and subsets by `seed`).

        No image is decoded here unless asked: `verify_images` decodes every image once (a bad one raises), and
        `on_corrupt_image` "skip" does too, dropping and counting the bad ones.

        The unlabelled images, when there are any, follow the labelled ones in "train" with the label
        `UNLABELED`; `unlabeled=False` leaves them out (for commands that only evaluate).

        This is the one data path: `train`, `eval` and the teacher cache all load through it.
        """
        dataset = _load_or_explain(self, seed, cache_dir)
        if self.unlabeled_dataset and unlabeled:
            dataset["train"] = with_unlabeled(
                dataset["train"], self._unlabeled_images(dataset, seed, cache_dir)
            )
        if self.verify_images or self.on_corrupt_image == "skip":
            dataset = scan_splits(
                dataset,
                self.on_corrupt_image,
                self.dataset_name,
                allow_classes_without_training_images=self.allow_classes_without_training_images,
            )
        return dataset

    def same_source_for_unlabeled(self) -> bool:
        """Whether --unlabeled_dataset names the training data itself (its unpicked rows are then used)."""
        return (
            os.path.expanduser(self.unlabeled_dataset or "") == os.path.expanduser(self.dataset_name)
            and self.unlabeled_split == self.train_split
        )

    def _unlabeled_images(
        self, dataset: datasets.DatasetDict, seed: int, cache_dir: str | None
    ) -> datasets.Dataset:
        if self.same_source_for_unlabeled():
            rest = dataset.unpicked_train
            if rest is None or not len(rest):
                raise UserError(
                    f"--unlabeled_dataset {self.unlabeled_dataset} is the training data itself, and every row is "
                    "used with its label: keep labels for a subset with --max_train_samples, and the other rows "
                    "become the unlabelled images."
                )
            return random_subset(rest, self.max_unlabeled_samples, seed)
        with _explained_load_errors("--unlabeled_dataset", self.unlabeled_dataset):
            return load_unlabeled_images(
                self.unlabeled_dataset,
                split=self.unlabeled_split,
                image_column=self.unlabeled_image_column,
                subset=self.max_unlabeled_samples,
                seed=seed,
                cache_dir=cache_dir,
            )


def _load_or_explain(args: DataArguments, seed: int, cache_dir: str | None) -> datasets.DatasetDict:
    name = args.dataset_name
    with _explained_load_errors("--dataset_name", name):
        return load_image_dataset(
            name,
            config_name=args.dataset_config,
            train_split=args.train_split,
            eval_split=args.eval_split,
            image_column=args.image_column,
            label_column=args.label_column,
            train_subset=args.max_train_samples,
            eval_subset=args.max_eval_samples,
            eval_fraction=args.eval_fraction,
            seed=seed,
            cache_dir=cache_dir,
            allow_classes_without_training_images=args.allow_classes_without_training_images,
        )


@contextmanager
def _explained_load_errors(flag: str, name: str) -> Iterator[None]:
    """Turn a loader's failure into one line naming `flag`; unexpected errors on existing data pass through."""
    try:
        yield
    except (UserError, CorruptImageError):
        raise
    except ValueError as error:  # the loader's own messages name the split, column or flag
        raise UserError(str(error)) from error
    except FileNotFoundError as error:
        raise MissingPathError(str(error)) from error
    except Exception as error:
        if os.path.exists(os.path.expanduser(name)) or name == "fashion_mnist":
            raise
        # `datasets` reports a missing local folder as a Hub lookup failure (a connection error when offline).
        raise UserError(
            f"{flag} {name}: not a local folder, and the Hub could not provide it "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Check the path or the dataset id."
        ) from error


@dataclass
class AugmentationArguments:
    augmentation: str = field(default="deit", metadata={"help": "deit (the paper's), light or none."})
    augment_on: str = field(
        default="workers",
        metadata={
            "help": "workers (PIL in the data-loader workers) or device (workers only decode; the training "
            "device applies the same recipe to the whole batch, per-sample parameters)."
        },
    )
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha; 0 disables."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 disables."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix over Mixup."})
    label_smoothing: float = field(
        default=0.1, metadata={"help": "Label smoothing of the targets (before Mixup/CutMix), in [0, 1)."}
    )
    repeated_augmentations: int = field(
        default=1, metadata={"help": "Copies of each image per epoch, each its own view (DeiT uses 3)."}
    )


@dataclass
class DistillationArguments:
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher: a run directory, a saved model or a Hub id (timm/... too)."}
    )
    distillation_type: str = field(default="hard", metadata={"help": "none, soft or hard."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation term, in [0, 1]."})
    tau: float = field(default=1.0, metadata={"help": "Temperature of soft distillation (> 0)."})
    kl_reduction: str = field(default="numel", metadata={"help": "numel (official DeiT) or batchmean."})
    scale_lr: bool = field(
        default=False, metadata={"help": "lr = learning_rate * global_batch / 512 (the DeiT recipe)."}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay for fine-tuning, e.g. 0.65 (lr * decay**(L-i))."},
    )
    allow_loss_change: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint saved with other loss settings (type, alpha, tau, kl_reduction, label "
            "smoothing); otherwise such a resume is refused."
        },
    )


@dataclass
class RunArguments:
    """What happens to the run's output folder and how its card describes it."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a finished run in --output_dir (otherwise an error; resuming is separate)."
        },
    )
    card_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset id for the card's metadata (a local dataset has none)."}
    )
    card_teacher_id: str | None = field(
        default=None,
        metadata={"help": "Hub model id of the teacher for the card (a local teacher has none)."},
    )
    card_base_model: str | None = field(
        default=None,
        metadata={"help": "Hub model id of the starting checkpoint for the card (a local one has none)."},
    )


@dataclass
class TeacherCacheArguments:
    """The teacher cache (`deit_distill.training.teacher_cache`): written by `cache-teacher`, read by `train`."""

    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a teacher cache: cache-teacher writes it; train reads the teacher's outputs "
            "from it instead of running the teacher (the run's view arguments must match it)."
        },
    )
    cache_epochs: int | None = field(
        default=None, metadata={"help": "cache-teacher: epochs of views to cache (default: the run's)."}
    )
    cache_top_k: int | None = field(
        default=None,
        metadata={"help": "cache-teacher: classes stored per view (default 10, or all if fewer; 0: all)."},
    )
    cache_dtype: str = field(
        default="float16", metadata={"help": "cache-teacher: float16 or float32 log-probabilities."}
    )
    cache_shard_views: int = field(
        default=50_000, metadata={"help": "cache-teacher: views per shard file and process."}
    )
    cache_cycle: bool = field(
        default=False,
        metadata={"help": "train: replay the cached epochs in cycles when the run is longer than the cache."},
    )


def check_cache_arguments(args: TeacherCacheArguments) -> None:
    if args.cache_epochs is not None:
        _check(args.cache_epochs >= 1, "cache_epochs", f"must be >= 1, got {args.cache_epochs}.")
    if args.cache_top_k is not None:
        _check(
            args.cache_top_k >= 0, "cache_top_k", f"must be >= 0 (0: all classes), got {args.cache_top_k}."
        )
    _check(
        args.cache_dtype in ("float16", "float32"),
        "cache_dtype",
        f"must be float16 or float32, got {args.cache_dtype!r}.",
    )
    _check(args.cache_shard_views >= 1, "cache_shard_views", f"must be >= 1, got {args.cache_shard_views}.")


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` keeping only the fields `cls` has (a run record holds more)."""
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


def _check(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise UserError(f"--{flag} {message}")


def check_data_arguments(args: DataArguments) -> None:
    for flag in ("max_train_samples", "max_eval_samples", "max_unlabeled_samples"):
        value = getattr(args, flag)
        _check(value is None or value >= 1, flag, f"must be a positive number of images, got {value}.")
    _check(0 < args.eval_fraction < 1, "eval_fraction", f"must be in (0, 1), got {args.eval_fraction}.")
    _check(
        args.on_corrupt_image in ("raise", "skip"),
        "on_corrupt_image",
        f"must be 'raise' or 'skip', got {args.on_corrupt_image!r}.",
    )
    _check_local_path(
        "dataset_name",
        args.dataset_name,
        "Give an existing folder of images (one sub-folder per class), a data file or a folder of them, or a "
        "Hub dataset id.",
    )
    if args.unlabeled_dataset:
        _check_local_path(
            "unlabeled_dataset",
            args.unlabeled_dataset,
            "Give an existing folder of images or data files, or a Hub dataset id.",
        )


def check_unlabeled_arguments(data_args: DataArguments, distill_args: DistillationArguments) -> None:
    """Unlabelled images train only through the teacher's term: refuse them without one."""
    if data_args.unlabeled_dataset and distill_args.distillation_type == "none":
        raise UserError(
            f"--unlabeled_dataset {data_args.unlabeled_dataset}: unlabelled images train only through the "
            "teacher's term; set --distillation_type hard or soft with --teacher, or leave --unlabeled_dataset out."
        )


def _check_local_path(flag: str, name: str, advice: str) -> None:
    # "./x", "/x", "~/x", "a/b/c" and "x.csv" can only be local; "a/b" may also be a Hub id (checked when loading).
    path = os.path.expanduser(name)
    local = (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or path.lower().endswith(tuple(TABLE_BUILDERS))
    )
    if local and not os.path.exists(path):
        raise MissingPathError(f"--{flag} {name}: no such folder or file. {advice}")
    if os.path.isfile(path):
        # Refuses a file that is not a data file, before anything is written.
        source_kind(name, f"--{flag}", labelled=flag != "unlabeled_dataset")


def check_training_arguments(
    model_args: ModelArguments,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    training_args: Any,
    cache_args: TeacherCacheArguments | None = None,
) -> None:
    """Out-of-range values and impossible combinations, each naming its flag."""
    check_folder_path(training_args.output_dir, "--output_dir")
    _check(
        training_args.learning_rate > 0, "learning_rate", f"must be > 0, got {training_args.learning_rate}."
    )
    _check(
        training_args.max_steps > 0 or training_args.num_train_epochs > 0,
        "num_train_epochs",
        f"must be > 0 (or set --max_steps), got {training_args.num_train_epochs}.",
    )
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, flag)
        _check(value >= 1, flag, f"must be >= 1, got {value}.")
    workers = training_args.dataloader_num_workers
    _check(
        workers >= 0, "dataloader_num_workers", f"must be >= 0 (0 loads in the main process), got {workers}."
    )
    _check(
        training_args.weight_decay >= 0, "weight_decay", f"must be >= 0, got {training_args.weight_decay}."
    )
    if model_args.image_size is not None:
        _check(
            model_args.image_size >= 1, "image_size", f"must be a positive size, got {model_args.image_size}."
        )
    if model_args.crop_pct is not None:
        _check(0 < model_args.crop_pct <= 1, "crop_pct", f"must be in (0, 1], got {model_args.crop_pct}.")
    if model_args.drop_path_rate is not None:
        _check(
            0 <= model_args.drop_path_rate < 1,
            "drop_path_rate",
            f"must be in [0, 1), got {model_args.drop_path_rate}.",
        )
    _check(
        model_args.architecture in (None, "deit_distill", "resnet"),
        "architecture",
        f"must be 'deit_distill' or 'resnet', got {model_args.architecture!r}.",
    )
    if model_args.architecture == "resnet" and model_args.model_name_or_path:
        raise UserError(
            "--architecture resnet builds a teacher from scratch; to fine-tune "
            f"{model_args.model_name_or_path}, leave --architecture unset."
        )
    _check(
        augmentation_args.augmentation in TRAIN_PRESETS,
        "augmentation",
        f"must be one of {', '.join(TRAIN_PRESETS)}, got {augmentation_args.augmentation!r}.",
    )
    _check(
        augmentation_args.augment_on in AUGMENT_ON,
        "augment_on",
        f"must be one of {', '.join(AUGMENT_ON)}, got {augmentation_args.augment_on!r}.",
    )
    if augmentation_args.augment_on == "device" and augmentation_args.augmentation == "none":
        raise UserError(
            "--augment_on device has nothing to do with --augmentation none (the eval transform runs in the "
            "workers); leave --augment_on at workers."
        )
    for flag in ("mixup", "cutmix"):
        value = getattr(augmentation_args, flag)
        _check(value >= 0, flag, f"alpha must be >= 0 (0 disables it), got {value}.")
    for flag in ("mixup_prob", "mixup_switch_prob"):
        value = getattr(augmentation_args, flag)
        _check(0 <= value <= 1, flag, f"must be in [0, 1], got {value}.")
    smoothing = augmentation_args.label_smoothing
    _check(0 <= smoothing < 1, "label_smoothing", f"must be in [0, 1), got {smoothing}.")
    repeats = augmentation_args.repeated_augmentations
    _check(repeats >= 1, "repeated_augmentations", f"must be >= 1, got {repeats}.")
    _check(
        distill_args.distillation_type in DISTILLATION_TYPES,
        "distillation_type",
        f"must be one of {', '.join(DISTILLATION_TYPES)}, got {distill_args.distillation_type!r}.",
    )
    _check(0 <= distill_args.alpha <= 1, "alpha", f"must be in [0, 1], got {distill_args.alpha}.")
    _check(distill_args.tau > 0, "tau", f"must be > 0, got {distill_args.tau}.")
    _check(
        distill_args.kl_reduction in ("numel", "batchmean"),
        "kl_reduction",
        f"must be 'numel' or 'batchmean', got {distill_args.kl_reduction!r}.",
    )
    if distill_args.layer_decay is not None:
        _check(
            0 < distill_args.layer_decay <= 1,
            "layer_decay",
            f"must be in (0, 1], got {distill_args.layer_decay}.",
        )
    from_cache = cache_args is not None and cache_args.teacher_cache is not None
    if distill_args.distillation_type != "none" and not distill_args.teacher and not from_cache:
        raise UserError(
            f"--distillation_type {distill_args.distillation_type} needs --teacher (a run directory, a saved "
            "model or a Hub id), or use --distillation_type none."
        )
    teacher = distill_args.teacher
    if (
        teacher
        and (teacher.startswith((".", "/", "~")) or os.path.isabs(teacher))
        and not os.path.exists(teacher)
    ):
        raise MissingPathError(f"--teacher {teacher}: no such folder. Train or download the teacher first.")
    mixes = (augmentation_args.mixup > 0 or augmentation_args.cutmix > 0) and augmentation_args.mixup_prob > 0
    if mixes and training_args.per_device_train_batch_size == 1:
        # Mixup/CutMix pair the images of a batch: one image has no partner, so nothing would be mixed.
        raise UserError(
            "--per_device_train_batch_size 1 cannot mix images (Mixup/CutMix pair the images of a batch): use 2 "
            "or more, or turn mixing off with --mixup 0 --cutmix 0."
        )


def check_settings_take_effect(
    model_args: ModelArguments,
    augmentation_args: AugmentationArguments,
    distill_args: DistillationArguments,
    run_args: RunArguments,
    training_args: Any,
    cache_args: TeacherCacheArguments,
) -> list[str]:
    """`train`'s settings that would silently do nothing: a contradiction is a `UserError`; a setting that is only
    without effect is logged as a warning, naming its flag. Returns the warnings (for tests)."""
    resuming = training_args.resume_from_checkpoint not in (None, "", "false", "False")
    if run_args.overwrite_output_dir and resuming:
        raise UserError(
            "--overwrite_output_dir true removes the checkpoints that --resume_from_checkpoint would resume from: "
            "use one of them."
        )
    defaults_of = {
        cls: cls() for cls in (AugmentationArguments, DistillationArguments, TeacherCacheArguments)
    }

    def changed(args: Any, name: str) -> bool:
        return getattr(args, name) != getattr(defaults_of[type(args)], name)

    unused: list[str] = []
    kind = distill_args.distillation_type
    if kind == "none":
        if distill_args.teacher:
            unused.append("--teacher (no teacher with --distillation_type none)")
        unused += [
            f"--{name} (no teacher with --distillation_type none)"
            for name in ("alpha", "tau", "kl_reduction")
            if changed(distill_args, name)
        ]
        if cache_args.teacher_cache:
            unused.append("--teacher_cache (no teacher with --distillation_type none)")
    elif kind == "hard":
        unused += [
            f"--{name} (soft distillation only; this run uses --distillation_type hard)"
            for name in ("tau", "kl_reduction")
            if changed(distill_args, name)
        ]
    mixup, cutmix = augmentation_args.mixup > 0, augmentation_args.cutmix > 0
    if not (mixup or cutmix):
        unused += [
            f"--{name} (Mixup and CutMix are off: --mixup 0 --cutmix 0)"
            for name in ("mixup_prob", "mixup_switch_prob")
            if changed(augmentation_args, name)
        ]
    elif mixup != cutmix and changed(augmentation_args, "mixup_switch_prob"):
        unused.append("--mixup_switch_prob (it chooses between Mixup and CutMix, and only one is on)")
    unused += [
        f"--{name} (cache-teacher only; train reads the cache as it was written)"
        for name in ("cache_epochs", "cache_top_k", "cache_dtype", "cache_shard_views")
        if changed(cache_args, name)
    ]
    if cache_args.cache_cycle and not cache_args.teacher_cache:
        unused.append("--cache_cycle (it replays a --teacher_cache, and there is none)")
    if model_args.model_name_or_path and model_args.variant != ModelArguments.variant:
        unused.append("--variant (a checkpoint keeps its own size; --variant builds from scratch)")
    if training_args.hub_model_id and not training_args.push_to_hub:
        unused.append("--hub_model_id (nothing is pushed without --push_to_hub true)")
    for setting in unused:
        logger.warning("%s has no effect in this run.", setting)
    return unused
