"""Image-classification datasets as a `DatasetDict` with splits "train" and "validation".

Every source (`load_source`: an imagefolder, a CSV/TSV/JSON/JSONL/parquet file or folder of them, a `save_to_disk`
folder, Fashion-MNIST or a Hub id) comes out the same way: an `image` column (`datasets.Image`, decodes to PIL)
and a `label` column (`datasets.ClassLabel`, with class names), whatever the source called them. Loading opens no
image; class mistakes are refused here, before a run writes anything. Decoding goes through `decode_image`, which
turns every image mode into upright RGB with `to_rgb` (the function the saved pipeline uses, so inference sees the
same pixels) and names the file and index when an image is corrupt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable
from PIL import Image

# One conversion for training, eval and the shipped pipeline; re-exported here as part of the data API.
from deit_distill.modeling_deit_distill.pipeline_deit_distill import to_rgb

from .errors import UserError, with_reason

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion_mnist"
# Debian package `dataset-fashion-mnist`; the embedded default so the demo and tests run offline.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Bump when the cached Fashion-MNIST layout changes, so stale caches are not reused.
_FASHION_MNIST_CACHE_VERSION = "1"
# Split names taken as the evaluation split, in this order, when `eval_split` is not given.
EVAL_SPLIT_CANDIDATES = ("validation", "valid", "val", "test")
# The label of an image without one: `datasets.ClassLabel`'s value for a missing label. The collator and the
# loss mask the label term of these images, which then train through the distillation term alone.
UNLABELED = -1
# Data files read with `datasets`' builder of that name.
TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# What a builder needs to be told about an extension: a .tsv is a csv with tabs (pandas' `sep`).
TABLE_READ_OPTIONS = {".tsv": {"sep": "\t"}}
# Obvious column names, tried (case-insensitively) when --image_column / --label_column are not given.
IMAGE_COLUMN_NAMES = (
    "image",
    "img",
    "image_path",
    "image_file",
    "path",
    "filepath",
    "file_path",
    "file",
    "filename",
    "file_name",
    "picture",
    "photo",
)
LABEL_COLUMN_NAMES = ("label", "labels", "class", "class_name", "category", "target")


def accepted_sources(labelled: bool = True) -> str:
    """What a source flag takes, for error messages; unlabelled images may be in a flat folder."""
    folder = "one sub-folder per class" if labelled else "flat or in sub-folders, whose names are ignored"
    return (
        f"a folder of images ({folder}), a .csv/.tsv/.json/.jsonl/.parquet file or a folder of them "
        "(train/validation/test files named by split), a save_to_disk folder, 'fashion_mnist' or a Hub dataset id"
    )


class CorruptImageError(ValueError):
    """An image that PIL cannot decode; the message names the dataset index and the file when known."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error is raised again in the main process as "Caught CorruptImageError in
        # DataLoader worker process N.\nOriginal Traceback ... CorruptImageError: MESSAGE": keep MESSAGE, one line.
        marker = f"{type(self).__name__}: "
        if "\nOriginal Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_image_dataset(
    source: str,
    *,
    config_name: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
    allow_classes_without_training_images: bool = False,
) -> datasets.DatasetDict:
    """Load an image-classification dataset with splits "train" and "validation".

    Args:
        source: Anything `load_source` reads: "fashion_mnist", a folder of images (one sub-folder per class),
            a CSV/TSV/JSON/JSONL/parquet file or a folder of them, a `save_to_disk` folder or a Hub dataset id.
        config_name: Hub dataset configuration.
        train_split: Split used for training.
        eval_split: Split used for evaluation. By default the first of "validation", "valid", "val", "test"
            that exists; without any, `eval_fraction` of the training split is held out (stratified by label,
            fixed by `seed`).
        image_column, label_column: Column names in the source, renamed to "image" and "label"; `None` picks
            the obvious one (`pick_column`). An image column may hold images, image bytes or file paths
            (relative paths are read against the data file's folder).
        train_subset, eval_subset: Keep this many examples of each split, stratified by label and fixed by
            `seed` (for quick runs).
        eval_fraction: Share of the training split held out when the source has no evaluation split.
        seed: Seed of the held-out split and of the subsets.
        cache_dir: Cache directory for `datasets` (and for the converted Fashion-MNIST).
        allow_classes_without_training_images: Keep classes that have no training image (with a warning)
            rather than refusing them: none in the source's training split, or none left once the held-out
            split or `train_subset` took them (`scan_splits` checks the same after dropping corrupt images).

    Returns:
        The splits; its `eval_split_used` attribute names the source of "validation" (e.g. "test", or
        "train (held out 10%)"), and `unpicked_train` holds the training rows that `train_subset` left out
        (`None` without a subset), which can serve as unlabelled images (`with_unlabeled`).

    Raises:
        UserError: The source cannot be read as an image-classification dataset; the message names the
            source, what is wrong and the flag that fixes it.
    """
    raw = load_source(source, config_name=config_name, cache_dir=cache_dir, image_column=image_column)

    if train_split not in raw:
        raise UserError(
            f"--dataset_name {source}: no split {train_split!r}; available splits: {list(raw)}. Set --train_split."
        )
    if eval_split is None:
        eval_split = next(
            (name for name in EVAL_SPLIT_CANDIDATES if name in raw and name != train_split), None
        )
    elif eval_split not in raw:
        raise UserError(
            f"--dataset_name {source}: no split {eval_split!r}; available splits: {list(raw)}. Set --eval_split."
        )

    splits = {"train": raw[train_split]}
    if eval_split is not None:
        splits["validation"] = raw[eval_split]
    if not len(splits["train"]):
        raise UserError(f"--dataset_name {source}: the {train_split} split has no rows.")
    train_columns = splits["train"].column_names
    if label_column is None and raw.kind == "imagefolder" and "label" not in train_columns:
        raise UserError(f"--dataset_name {source}: {_class_folder_problem(Path(os.path.expanduser(source)))}")
    image_column = pick_column(splits["train"], "image", image_column, source)
    label_column = pick_column(splits["train"], "label", label_column, source, exclude=image_column)
    for name, dataset in splits.items():
        splits[name] = _canonical_columns(dataset, image_column, label_column, source, name)
    splits = _as_class_labels(splits, source, label_column, raw.kind, allow_classes_without_training_images)
    # Each step below may drop every training image of a class: refused (or warned about) naming that step.
    keep_classes = {"where": f"--dataset_name {source}", "allow": allow_classes_without_training_images}

    if "validation" not in splits:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
        train = splits["train"]
        held_out = _stratified_indices(_labels(train), round(len(train) * eval_fraction), seed)
        if not len(held_out):
            raise UserError(
                f"--dataset_name {source}: there is no eval split, and --eval_fraction {eval_fraction} of the "
                f"{len(train)} training images holds out none to evaluate on; raise --eval_fraction, add images, or "
                "name an eval split with --eval_split."
            )
        keep = np.setdiff1d(np.arange(len(train)), held_out)
        splits = {"train": train.select(keep), "validation": train.select(held_out)}
        _check_classes_kept(
            train,
            splits["train"],
            f"holding out {eval_fraction:.0%} of the {train_split} split for evaluation (there is no eval split; "
            f"--eval_fraction {eval_fraction})",
            "add images of them (a class needs two to be in both splits), or name an eval split with --eval_split",
            **keep_classes,
        )

    full_train, unpicked = splits["train"], None
    picked = _subset_indices(full_train, train_subset, seed)
    if picked is not None:
        splits["train"] = full_train.select(picked)
        unpicked = full_train.select(np.setdiff1d(np.arange(len(full_train)), picked))
        classes = len(_class_names(full_train)) - len(_classes_without_rows(full_train))
        too_few = f"{train_subset} images cannot hold {classes} classes; " if train_subset < classes else ""
        _check_classes_kept(
            full_train,
            splits["train"],
            f"--max_train_samples {train_subset}",
            f"raise --max_train_samples ({too_few}the subset keeps each class's share of the images, so a small "
            "class needs a larger subset)",
            **keep_classes,
        )
    splits["validation"] = _subset(splits["validation"], eval_subset, seed)
    result = datasets.DatasetDict(splits)
    # Where "validation" came from, for the run record and the card (the split objects do not keep it).
    result.eval_split_used = eval_split or f"{train_split} (held out {eval_fraction:.0%})"
    result.unpicked_train = unpicked
    return result


def load_unlabeled_images(
    source: str,
    *,
    config_name: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    subset: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Images without labels, as a dataset with one `image` column.

    Args:
        source: Anything `load_source` reads; a folder of images may be flat or in sub-folders, whose names
            are ignored.
        split, image_column, config_name, cache_dir: As in `load_image_dataset`.
        subset: Keep this many images, drawn at random (fixed by `seed`).
    """
    flag = "--unlabeled_dataset"
    raw = load_source(
        source,
        config_name=config_name,
        cache_dir=cache_dir,
        image_column=image_column,
        drop_labels=True,
        flag=flag,
    )
    if split not in raw:
        raise UserError(
            f"{flag} {source}: no split {split!r}; available splits: {list(raw)}. Set --unlabeled_split."
        )
    dataset = raw[split]
    column = pick_column(
        dataset, "image", image_column, source, flag="--unlabeled_image_column", source_flag=flag
    )
    dataset = dataset.select_columns([column]).rename_columns({column: "image"})
    if dataset.features["image"] != datasets.Image():
        dataset = dataset.cast_column("image", datasets.Image())
    _check_image_paths(dataset, source, split, flag)
    return random_subset(dataset, subset, seed)


# ---------------------------------------------------------------- the one loader of every kind of source


class SourceSplits(datasets.DatasetDict):
    """A source's splits as read, before columns are picked; `kind` says what the source was."""

    kind: str = "hub"


def source_kind(source: str, flag: str = "--dataset_name", *, labelled: bool = True) -> str:
    """What `source` names: "fashion_mnist", "table" (a data file), "tables" (a folder of data files),
    "saved" (a `save_to_disk` folder), "imagefolder" or "hub" (anything that is not a local path).

    Args:
        labelled: Whether the source is read for its labels (its error message then asks for class folders).

    Raises:
        UserError: `source` is a local file or folder of none of these kinds.
    """
    return _classify(source, flag, labelled)[0]


def load_source(
    source: str,
    *,
    config_name: str | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
    drop_labels: bool = False,
    flag: str = "--dataset_name",
) -> SourceSplits:
    """Every split of `source`, read with the `datasets` loader its kind calls for (`source_kind`).

    Data files are read with `datasets`' csv/json/parquet builders, split by their names as `datasets` does
    ("train", "validation"/"valid"/"val"/"dev", "test"/"eval", in the file or folder name; a lone file is the
    train split). Relative paths in the image column (`image_column`, or the one `pick_column` finds) are read
    against the folder of the file that holds them (of the folder, for a `save_to_disk` dataset). Nothing here
    opens an image.

    Args:
        drop_labels: For a folder of images, ignore sub-folder names (unlabelled images).
        flag: The flag that named `source`, for error messages.
    """
    kind, contents = _classify(source, flag, labelled=not drop_labels)
    path = Path(os.path.expanduser(source))
    if kind == FASHION_MNIST:
        splits = _load_fashion_mnist(FASHION_MNIST_DIR, cache_dir)
    elif kind == "table":
        splits = _load_tables({"train": [path]}, source, image_column, cache_dir, flag)
    elif kind == "tables":
        files = _tables_by_split(path, contents.tables, source, flag)
        splits = _load_tables(files, source, image_column, cache_dir, flag)
    elif kind == "saved":
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as error:  # a damaged save_to_disk folder: name it, with `datasets`' reason
            reason = _innermost(error)
            raise UserError(
                with_reason(
                    f"{flag} {source}: cannot read this save_to_disk folder ({type(reason).__name__}: ",
                    reason,
                    "); save it again.",
                )
            ) from error
        saved = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        splits = {
            name: _with_paths_resolved(split, image_column, path, source, flag)
            for name, split in saved.items()
        }
    elif kind == "imagefolder":
        if contents.empty_folders and not drop_labels:
            raise UserError(
                f"{flag} {source}: the folder {contents.empty_folders[0]} is empty, so its class would be "
                "dropped. Add its images or remove it."
            )
        # `drop_labels=None` lets `datasets` take labels from the sub-folder names.
        splits = None if drop_labels else class_folders_dataset(path, contents)
        if splits is None:
            splits = datasets.load_dataset(
                "imagefolder", data_dir=str(path), drop_labels=drop_labels or None, cache_dir=cache_dir
            )
    else:
        splits = datasets.load_dataset(source, config_name, cache_dir=cache_dir)
    result = SourceSplits(splits)
    result.kind = kind
    return result


def pick_column(
    dataset: datasets.Dataset,
    role: str,
    name: str | None,
    source: str,
    *,
    exclude: str | None = None,
    flag: str | None = None,
    source_flag: str = "--dataset_name",
    log: bool = True,
) -> str:
    """The column of `dataset` that holds the images (`role` "image") or the labels ("label").

    `name` given: that column, which must exist. Otherwise the column named `role`, else the one column with an
    `Image` (`ClassLabel`) feature, else the one column with an obvious name (`IMAGE_COLUMN_NAMES`,
    `LABEL_COLUMN_NAMES`, case and surrounding spaces aside), else, for labels, the one column of names or
    indices left beside the images (`exclude`). Every choice made here is logged (unless `log` is false), with the
    other columns that could have been chosen and the flag that chooses them.

    Raises:
        UserError: No such column, or no single obvious one; the message lists the columns and the flag to set.
    """
    flag = flag or f"--{role}_column"
    columns = [column for column in dataset.column_names if column != exclude]
    where = f"{source_flag} {source}"
    if name is not None:
        if name not in dataset.column_names:
            raise UserError(
                f"{where}: no column {name!r}; available columns: {dataset.column_names}. Set {flag}."
            )
        return name
    feature_type = datasets.Image if role == "image" else datasets.ClassLabel
    typed = [column for column in columns if isinstance(dataset.features[column], feature_type)]
    known = IMAGE_COLUMN_NAMES if role == "image" else LABEL_COLUMN_NAMES
    # Case and surrounding spaces aside: a CSV header "image, label" names its second column " label".
    named = [column for column in columns if column.strip().lower() in known]
    # A table of two columns, images and one other of names or indices: that other one holds the labels.
    only = columns if role == "label" and exclude and len(columns) == 1 else []
    only = [
        column
        for column in only
        if _holds_names(dataset.features[column]) or _holds_indices(dataset.features[column])
    ]
    for candidates in ([role] if role in columns else [], typed, named, only):
        if len(candidates) > 1:
            raise UserError(
                f"{where}: several columns could hold the {role}s ({', '.join(candidates)}); set {flag} to one of "
                "them."
            )
        if candidates:
            chosen = candidates[0]
            if log:
                passed_over = [c for c in dict.fromkeys(typed + named + only) if c != chosen]
                others = (
                    f" (set {flag} to choose another)"
                    if not passed_over
                    else f"; column {passed_over[0]!r} could also hold them (set {flag} {passed_over[0]} to use it)"
                    if len(passed_over) == 1
                    else f"; columns {', '.join(map(repr, passed_over))} could also hold them (set {flag} to one)"
                )
                logger.info("%s: reading the %ss from column %r%s.", where, role, chosen, others)
            return chosen
    raise UserError(f"{where}: no {role} column found among the columns {dataset.column_names}; set {flag}.")


# Names that make `datasets` read a folder as several splits (`datasets.data_files.SPLIT_KEYWORDS`, as a whole
# word between non-word characters or digits): such folders go through `datasets` itself.
_SPLIT_WORD = re.compile(
    r"(?:^|[-._ 0-9/])(?:train|training|validation|valid|dev|val|test|testing|eval|evaluation)(?:[-._ 0-9/]|$)",
    re.IGNORECASE | re.MULTILINE,
)


def class_folders_dataset(root: Path, contents: _FolderContents) -> datasets.DatasetDict | None:
    """A folder of class sub-folders (`root/CLASS/IMAGE`, images only) as `datasets`' imagefolder builds it, in
    one pass over the listing already made: the same rows in the same order (sorted paths) with the same labels
    (sorted folder names).

    `datasets.load_dataset("imagefolder", data_dir=...)` resolves about 30 split patterns, each a recursive glob
    with a stat per file, on every start, before it even looks at its cache: about 2 ms an image on a 20,000-image
    folder here, which is most of an hour at ImageNet's 1.28M. Anything this does not mirror exactly (split-named
    parts, metadata files, other files, deeper or shallower images, `__` folders) returns `None` and is loaded by
    `datasets`.
    """
    if contents.tables or contents.others or contents.empty_folders or not contents.images:
        return None
    prefix = str(root).rstrip(os.sep) + os.sep
    if str(contents.images[0]).startswith(prefix):  # the listing's paths start with `root/`: cut it off
        relative = sorted(str(image)[len(prefix) :] for image in contents.images)
    else:  # e.g. root "." (pathlib drops a leading "./")
        relative = sorted(str(image.relative_to(root)) for image in contents.images)
    classes = sorted({name.split(os.sep, 1)[0] for name in relative})
    # `datasets` gives labels only for two classes or more (and then tells of one class).
    if len(classes) < 2 or any(name.count(os.sep) != 1 for name in relative):
        return None
    if any(name.startswith("__") for name in classes):
        return None
    metadata_names = datasets.packaged_modules.imagefolder.ImageFolder.METADATA_FILENAMES
    if any((root / folder / name).exists() for folder in ("", *classes) for name in metadata_names):
        return None
    if _SPLIT_WORD.search("\n".join(relative)):
        return None
    label_of = {name: index for index, name in enumerate(classes)}
    base = os.path.abspath(root)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    table = pa.table(
        {
            "image": pa.StructArray.from_arrays(
                [
                    pa.nulls(len(relative), pa.binary()),
                    pa.array([os.path.join(base, name) for name in relative]),
                ],
                names=["bytes", "path"],
            ),
            "label": pa.array([label_of[name.split(os.sep, 1)[0]] for name in relative], pa.int64()),
        }
    )
    train = datasets.Dataset(
        InMemoryTable(table.cast(features.arrow_schema)),
        info=datasets.DatasetInfo(features=features),
        split=datasets.Split.TRAIN,
    )
    return datasets.DatasetDict({"train": train})


def _classify(source: str, flag: str, labelled: bool) -> tuple[str, _FolderContents | None]:
    """`source_kind`, with the folder listing it read (`None` unless a folder was listed)."""
    accepted = accepted_sources(labelled)
    if source == FASHION_MNIST:
        return FASHION_MNIST, None
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if path.suffix.lower() in TABLE_BUILDERS:
            return "table", None
        raise UserError(
            f"{flag} {source}: {f'a {path.suffix} file' if path.suffix else 'a file without extension'}, not a "
            f"data file. {flag} takes {accepted}."
        )
    if not path.is_dir():
        return "hub", None
    if _is_saved_dataset(path):
        return "saved", None
    contents = _list_folder(path)
    if contents.tables:
        return "tables", contents
    if contents.images:
        return "imagefolder", contents
    found = f"files such as {', '.join(contents.others[:3])}" if contents.others else "no files"
    raise UserError(
        f"{flag} {source}: a folder with neither images nor data files ({found}). {flag} takes {accepted}."
    )


@dataclass
class _FolderContents:
    tables: list[Path]  # data files (metadata.* aside: an imagefolder's own)
    images: list[Path]
    others: list[str]  # names of other files
    empty_folders: list[Path]


def _list_folder(root: Path) -> _FolderContents:
    """The files under `root` by kind (hidden files and folders aside), in one walk that opens nothing."""
    image_extensions = datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
    contents = _FolderContents([], [], [], [])
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files = sorted(name for name in files if not name.startswith("."))
        if not subfolders and not files and Path(folder) != root:
            contents.empty_folders.append(Path(folder))
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in TABLE_BUILDERS and not name.startswith("metadata."):
                contents.tables.append(Path(folder, name))
            elif suffix in image_extensions:
                contents.images.append(Path(folder, name))
            elif not name.startswith("metadata."):
                contents.others.append(name)
    return contents


def _is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _tables_by_split(root: Path, tables: list[Path], source: str, flag: str) -> dict[str, list[Path]]:
    """The data files of each split, named as `datasets` names them (the split's keyword in the file name, or
    else in a folder name); without any split name, every file is the train split."""
    builders = sorted({TABLE_BUILDERS[path.suffix.lower()] for path in tables})
    if len(builders) > 1:
        raise UserError(
            f"{flag} {source}: data files of several kinds ({', '.join(builders)}); keep one kind, or name one file."
        )

    def split_of(path: Path) -> str | None:
        parts = path.relative_to(root).parts
        for part in (Path(parts[-1]).stem, *reversed(parts[:-1])):
            words = set(re.split(r"[-._ 0-9]+", part.lower()))
            for split, keywords in datasets.data_files.SPLIT_KEYWORDS.items():
                if words & set(keywords):
                    return str(split)
        return None

    named = {path: split_of(path) for path in tables}
    if not any(named.values()):
        return {"train": tables}
    ignored = [str(path.relative_to(root)) for path, split in named.items() if split is None]
    if ignored:
        logger.warning(
            "%s %s: ignoring data files without a split name: %s", flag, source, ", ".join(ignored)
        )
    return {
        split: [path for path, name in named.items() if name == split]
        for split in ("train", "validation", "test")
        if split in named.values()
    }


def _load_tables(
    files_by_split: dict[str, list[Path]],
    source: str,
    image_column: str | None,
    cache_dir: str | None,
    flag: str,
) -> dict[str, datasets.Dataset]:
    """Data files read with `datasets`' builder for their kind, one read per split and folder, so that relative
    image paths are read against the folder of the file that holds them."""
    splits = {}
    for split, files in files_by_split.items():
        by_folder: dict[tuple[Path, str], list[Path]] = {}  # a folder's .csv and .tsv files are read apart
        for path in files:
            by_folder.setdefault((path.parent, path.suffix.lower()), []).append(path)
        parts = []
        for (folder, suffix), paths in by_folder.items():
            builder = TABLE_BUILDERS[suffix]
            # A file the builder cannot parse is logged by it (ERROR) before it raises: our one line below
            # carries its reason, so that log line would only say it twice.
            builders_log = logging.getLogger("datasets.packaged_modules")
            level = builders_log.level
            builders_log.setLevel(logging.CRITICAL)
            try:
                part = datasets.load_dataset(
                    builder,
                    data_files={split: [str(path) for path in paths]},
                    split=split,
                    cache_dir=cache_dir,
                    **TABLE_READ_OPTIONS.get(suffix, {}),
                )
            except Exception as error:  # a file `datasets` cannot parse: name it, with the parser's reason
                reason = _innermost(error)
                if "corresponds to no data" in str(reason):  # `datasets`' words for a split of no rows
                    raise UserError(
                        f"{flag} {source}: {', '.join(str(path) for path in paths)} holds no rows."
                    ) from error
                raise UserError(
                    with_reason(
                        f"{flag} {source}: cannot read {', '.join(str(path) for path in paths)} as {builder} "
                        f"({type(reason).__name__}: ",
                        reason,
                        ").",
                    )
                ) from error
            finally:
                builders_log.setLevel(level)
            parts.append(_with_paths_resolved(part, image_column, folder, source, flag))
        splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return splits


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _with_paths_resolved(
    dataset: datasets.Dataset, image_column: str | None, folder: Path, source: str, flag: str
) -> datasets.Dataset:
    """`dataset` with the relative file paths of its image column (a column of strings) made absolute against
    `folder`; anything else unchanged. Paths only: no image is opened."""
    try:
        column = pick_column(dataset, "image", image_column, source, source_flag=flag, log=False)
    except UserError:
        return dataset  # reported, with the column names, when the columns are picked
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES) or not len(dataset):
        return dataset
    values = dataset.select_columns([column]).with_format("arrow")[:][column].to_pylist()
    folder = folder.resolve()
    resolved = [
        value if value is None or os.path.isabs(value) or "://" in value else str(folder / value)
        for value in values
    ]
    order = dataset.column_names
    return dataset.remove_columns(column).add_column(column, resolved).select_columns(order)


def _check_image_paths(dataset: datasets.Dataset, source: str, split: str, flag: str) -> None:
    """Refuse an image column whose file paths all point nowhere (checked on up to 100 evenly spaced rows, so
    start-up stays independent of the dataset's size); warn when only some do."""
    if not len(dataset):
        return
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), 100)).round().astype(int))
    stored = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    values = stored[rows.tolist()]["image"]
    paths = [
        value["path"]
        for value in values
        if value and value.get("bytes") is None and value.get("path") and "://" not in value["path"]
    ]
    missing = [path for path in paths if not os.path.isfile(path)]
    if paths and len(missing) == len(paths):
        raise UserError(
            f"{flag} {source}: none of the {len(paths)} image files checked in the {split} split exists, e.g. "
            f"{missing[0]!r}. Relative paths are read against the folder of the data file that holds them: make "
            "them relative to it, or absolute."
        )
    if missing:
        logger.warning(
            "%s %s: %d of %d image files checked in the %s split do not exist, e.g. %r; reading them will fail "
            "(--on_corrupt_image skip drops them).",
            flag,
            source,
            len(missing),
            len(paths),
            split,
            missing[0],
        )


def _class_folder_problem(root: Path) -> str:
    """Why a folder of images gave no labels: one class folder, or none."""
    folders = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if len(folders) == 1:
        return (
            f"one class folder ({folders[0]}); a classifier needs at least two classes, one sub-folder of "
            "images per class."
        )
    if not folders:
        return "the images are not in class sub-folders; put them in one sub-folder per class (at least two)."
    return (
        f"no class sub-folders found under {', '.join(folders)}; put the images in one sub-folder per class "
        "(at least two)."
    )


def with_unlabeled(train: datasets.Dataset, unlabeled: datasets.Dataset) -> datasets.Dataset:
    """`train` followed by the `unlabeled` images, labelled `UNLABELED` under `train`'s label feature."""
    if not len(unlabeled):
        return train
    # A new column with `train`'s feature rather than a cast, which would rewrite every image's bytes.
    unlabeled = unlabeled.select_columns(["image"]).add_column(
        "label", np.full(len(unlabeled), UNLABELED, np.int64), feature=train.features["label"]
    )
    if unlabeled.features != train.features:
        unlabeled = unlabeled.cast(train.features)
    return datasets.concatenate_datasets([train, unlabeled])


def count_unlabeled(dataset: datasets.Dataset) -> int:
    """How many examples of `dataset` have no label (`UNLABELED`)."""
    return int((_labels(dataset) == UNLABELED).sum()) if len(dataset) else 0


def decode_image(value: Any, index: int | None = None) -> Image.Image:
    """Decode one value of an image column into an upright RGB PIL image (`to_rgb`).

    Args:
        value: A PIL image, a `{"bytes", "path"}` dict (an `Image(decode=False)` column), or a file path.
        index: The example's index in its dataset, named in the error message.

    Raises:
        CorruptImageError: The image cannot be decoded; the message names the index and the file if known.
    """
    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif path is not None:
            image = Image.open(path)
        else:
            raise ValueError(f"no image bytes or path in {type(value).__name__} value")
        if not isinstance(value, Image.Image):
            # PIL warns between its pixel limit and twice it, and raises above: both count as corrupt here, so
            # that `--on_corrupt_image skip` drops them and the message names the file.
            _refuse_over_pixel_limit(image)
        # `open` only reads the header; `load` decodes the pixels, where truncated files fail.
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        location = [f"index {index}"] if index is not None else []
        if path:
            location.append(f"file {path!r}")
        raise CorruptImageError(
            with_reason(
                f"Cannot decode image ({', '.join(location) or 'location unknown'}): {type(error).__name__}: ",
                error,
                ". Remove or replace it, or drop corrupt images before training with --on_corrupt_image skip "
                "(in Python: scan_images(dataset, on_error='skip')).",
            )
        ) from error


def _refuse_over_pixel_limit(image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} = {image.width * image.height} pixels, over PIL's limit "
            f"Image.MAX_IMAGE_PIXELS = {limit}"
        )


def scan_splits(
    dataset: datasets.DatasetDict,
    on_error: str,
    source: str,
    *,
    allow_classes_without_training_images: bool = False,
) -> datasets.DatasetDict:
    """`scan_images` on every split of `dataset` (in place); with "skip", refuses a split left without images,
    and a class left without training images unless allowed, naming the flag that dropped them."""
    where = f"--dataset_name {source}"
    for split in list(dataset):
        before = dataset[split]
        dataset[split], skipped = scan_images(before, on_error=on_error)
        if not skipped:
            continue
        logger.warning("Skipped %d undecodable images in the %s split.", skipped, split)
        if not len(dataset[split]):
            raise UserError(
                f"{where}: all {skipped} images of the {split} split are corrupt (--on_corrupt_image skip dropped "
                "every one); check that the files are images."
            )
        if split == "train":
            _check_classes_kept(
                before,
                dataset[split],
                f"--on_corrupt_image skip (it dropped {skipped} undecodable images)",
                "replace their corrupt images",
                where=where,
                allow=allow_classes_without_training_images,
            )
    return dataset


def scan_images(
    dataset: datasets.Dataset, on_error: str = "raise", *, batch_size: int = 1000
) -> tuple[datasets.Dataset, int]:
    """Decode every image once, before training, and deal with the corrupt ones.

    Args:
        dataset: A dataset with an `image` column.
        on_error: "raise" stops at the first corrupt image with a `CorruptImageError` naming its index and
            file; "skip" drops every corrupt image.
        batch_size: Rows read per step.

    Returns:
        The dataset (without the corrupt images for "skip") and the number of images skipped.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    # Read the stored bytes/paths so the decoding, and its errors, are ours rather than the column's.
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    corrupt = []
    for start in range(0, len(raw), batch_size):
        for offset, value in enumerate(raw[start : start + batch_size]["image"]):
            try:
                decode_image(value, start + offset)
            except CorruptImageError:
                if on_error == "raise":
                    raise
                corrupt.append(start + offset)
    if not corrupt:
        return dataset, 0
    return dataset.select(np.setdiff1d(np.arange(len(dataset)), corrupt)), len(corrupt)


def _load_fashion_mnist(directory: Path, cache_dir: str | None) -> datasets.DatasetDict:
    """Fashion-MNIST from its idx files, converted once to PNG bytes and cached with `save_to_disk`."""
    files = {
        split: (directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [str(path) for pair in files.values() for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with `apt-get install dataset-fashion-mnist`, "
            "or load the Hub copy with --dataset_name zalando-datasets/fashion_mnist."
        )
    # The key follows the files, so a reinstalled package invalidates the cache.
    stamp = [_FASHION_MNIST_CACHE_VERSION] + [
        f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for pair in files.values() for path in pair
    ]
    key = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]
    cache_root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "deit_distill"
    target = cache_root / f"fashion_mnist-{key}"
    if target.is_dir():
        return datasets.load_from_disk(str(target))

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images = _read_idx(images_path, expected_magic=2051)
        labels = _read_idx(labels_path, expected_magic=2049)
        # compress_level=1: about 10% faster to write than the default, for 28x28 images the size is the same.
        encoded = []
        for array in images:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        splits[split] = datasets.Dataset.from_dict(
            {"image": encoded, "label": labels.astype(np.int64)}, features=features
        )

    # Write to a private folder and rename it into place, so concurrent processes never see a partial cache.
    partial = cache_root / f".fashion_mnist-{key}.{uuid.uuid4().hex}"
    datasets.DatasetDict(splits).save_to_disk(str(partial))
    try:
        partial.rename(target)
    except OSError:
        # Another process finished first; its copy is identical.
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an idx file (big-endian magic, then one big-endian uint32 per dimension, then uint8 data)."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path} is not an idx file of the expected kind (magic {magic}, expected {expected_magic})."
        )
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _canonical_columns(
    dataset: datasets.Dataset, image_column: str, label_column: str, source: str, split: str
) -> datasets.Dataset:
    """Keep only the image and label columns, named "image" and "label", with an `Image` feature."""
    for column, role in ((image_column, "image"), (label_column, "label")):
        pick_column(dataset, role, column, source)  # refuses a split without the column
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    if dataset.features["image"] != datasets.Image():
        # File paths, image bytes or an `Image(decode=False)` column: a cast of the stored values, no decoding.
        dataset = dataset.cast_column("image", datasets.Image())
    _check_image_paths(dataset, source, split, "--dataset_name")
    return dataset


def _as_class_labels(
    splits: dict[str, datasets.Dataset],
    source: str,
    label_column: str,
    kind: str,
    allow_classes_without_training_images: bool,
) -> dict[str, datasets.Dataset]:
    """Give every split the training split's `ClassLabel`, and refuse what would train a wrong classifier.

    Class names are the `ClassLabel`'s; else the sorted names found in the training split (any string type); else,
    for class indices, "0" ... "N-1" up to the largest training index. Refused: fewer than two classes; evaluation
    labels the training split lacks; classes without a training image, unless allowed (then a warning).
    """
    where = f"--dataset_name {source}"
    class_label = _class_label_of(splits["train"], where, label_column)
    for name, dataset in splits.items():
        splits[name] = _with_class_label(dataset, class_label, name, where, label_column)
    names = class_label.names
    if len(names) < 2:
        found = f"one class ({names[0]})" if names else "no class"
        hint = (
            "put the images in one sub-folder per class"
            if kind == "imagefolder"
            else f"check that --label_column ({label_column}) is the column of classes"
        )
        raise UserError(f"{where}: the training split has {found}; a classifier needs at least two: {hint}.")
    _warn_of_near_duplicates(names, where)
    without = _classes_without_rows(splits["train"])
    if without:
        in_eval = (
            set(without) - set(_classes_without_rows(splits["validation"]))
            if "validation" in splits
            else set()
        )
        described = ", ".join(
            f"{name} (in the eval split only)" if name in in_eval else name for name in without
        )
        _refuse_classes_without_images(
            where,
            f"{len(without)} of {len(names)} classes have no training image: {_shorten(described)}",
            "add training images for them, remove them",
            allow_classes_without_training_images,
        )
    return splits


def _refuse_classes_without_images(where: str, problem: str, fix: str, allow: bool) -> None:
    """The one message for classes left without a training image: refused, or kept with a warning when `allow`."""
    if not allow:
        raise UserError(
            f"{where}: {problem}. Their outputs would never train; {fix}, or keep them with "
            "--allow_classes_without_training_images true."
        )
    logger.warning("%s: %s; kept (--allow_classes_without_training_images true).", where, problem)


def _check_classes_kept(
    before: datasets.Dataset, after: datasets.Dataset, step: str, fix: str, *, where: str, allow: bool
) -> None:
    """Refuse (or, when `allow`, warn about) the classes that have rows in `before` and none in `after`, the
    training split once `step` dropped some of its images; `fix` says what to change."""
    had = set(_class_names(before)) - set(_classes_without_rows(before))
    lost = [name for name in _classes_without_rows(after) if name in had]
    if lost:
        problem = (
            f"{step} left no training image of {len(lost)} of {len(_class_names(after))} classes: "
            f"{_shorten(', '.join(lost))}"
        )
        _refuse_classes_without_images(where, problem, fix, allow)


def _warn_of_near_duplicates(names: list[str], where: str) -> None:
    """Warn of class names that differ only by case or surrounding whitespace ('cat' and 'Cat ', often one class
    mistyped): they stay separate classes, since only the user knows whether they are one. Names with surrounding
    whitespace are kept as written too (as pandas and RFC 4180 read a CSV cell), and warned of."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.strip().casefold(), []).append(name)
    similar = [group for group in groups.values() if len(group) > 1]
    if similar:
        shown = "; ".join(" and ".join(map(repr, group)) for group in similar)
        logger.warning(
            "%s: class names that differ only by case or surrounding spaces are separate classes: %s. If they are "
            "one class, give them one spelling in the labels.",
            where,
            _shorten(shown),
        )
    spaced = [name for group in groups.values() if len(group) == 1 for name in group if name != name.strip()]
    if spaced:
        logger.warning(
            '%s: class names with surrounding spaces, kept as written: %s (a CSV written with ", " between '
            "cells has them).",
            where,
            _shorten(", ".join(map(repr, spaced))),
        )


def _class_names(dataset: datasets.Dataset) -> list[str]:
    return dataset.features["label"].names


def _class_label_of(train: datasets.Dataset, where: str, label_column: str) -> datasets.ClassLabel:
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature
    if _holds_names(feature):
        names = sorted(str(value) for value in train.unique("label") if value is not None)
        return datasets.ClassLabel(names=names)
    if _holds_indices(feature):
        indices = [value for value in train.unique("label") if value is not None and value >= 0]
        return datasets.ClassLabel(names=[str(i) for i in range(max(indices, default=-1) + 1)])
    raise UserError(
        f"{where}: the label column {label_column!r} holds {feature}, not class names or indices; set "
        "--label_column to the column of classes."
    )


def _with_class_label(
    dataset: datasets.Dataset, class_label: datasets.ClassLabel, split: str, where: str, label_column: str
) -> datasets.Dataset:
    """`dataset` with its labels as indices into `class_label`; labels outside it are refused, naming them."""
    feature = dataset.features["label"]
    name = "training" if split == "train" else "eval"
    if isinstance(feature, datasets.ClassLabel):
        if feature.names != class_label.names:
            raise UserError(
                f"{where}: the {name} split's classes {_shorten(', '.join(feature.names))} differ from the training "
                f"split's {_shorten(', '.join(class_label.names))}; both splits must share one label space."
            )
        ids = _labels(dataset)
    else:
        column = dataset.select_columns(["label"]).with_format("arrow")[:]["label"]
        if _holds_names(feature):
            column = pc.cast(column, pa.string())
            found = pc.index_in(column, value_set=pa.array(class_label.names, pa.string()))
            unknown = pc.unique(
                pc.filter(column, pc.and_(pc.is_null(found), pc.is_valid(column)))
            ).to_pylist()
        elif _holds_indices(feature):
            found = pc.cast(column, pa.int64())
            unknown = [
                value
                for value in pc.unique(found).to_pylist()
                if value is not None and value >= len(class_label.names)
            ]
        else:
            raise UserError(
                f"{where}: the {name} split's label column {label_column!r} holds {feature}, unlike the training split's."
            )
        if unknown:
            shown = _shorten(", ".join(str(value) for value in sorted(unknown, key=str)))
            raise UserError(
                f"{where}: the {name} split has {len(unknown)} label(s) the training split does not have: {shown}. "
                "Correct or remove those rows (the model can only learn the training split's classes)."
            )
        ids = found.fill_null(UNLABELED).to_numpy().astype(np.int64)
        # A new column rather than a cast: casting rewrites every column, image bytes included.
        dataset = dataset.remove_columns("label").add_column("label", ids, feature=class_label)
        dataset = dataset.select_columns(["image", "label"])
    if len(ids) and ids.min() < 0:
        raise UserError(
            f"{where}: the {name} split has rows without a class (label {int(ids.min())}, or empty); remove them, "
            "or choose another split with --eval_split or --train_split."
        )
    return dataset


_STRING_DTYPES = ("string", "large_string", "string_view")


def _holds_names(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES


def _holds_indices(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _classes_without_rows(dataset: datasets.Dataset) -> list[str]:
    """The class names of `dataset`'s `ClassLabel` that none of its rows has."""
    names = dataset.features["label"].names
    labels = _labels(dataset)
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    return [name for name, count in zip(names, counts, strict=True) if not count]


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` examples drawn so each class keeps its share (to within one example)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    # Rank each example within its class in a random order; rank / class size is its quantile, so the `n`
    # lowest quantiles take the same fraction of every class. The jitter breaks ties between classes at random.
    order = rng.permutation(len(labels))
    by_class = order[np.argsort(labels[order], kind="stable")]
    ranks = np.empty(len(labels))
    ranks[by_class] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    quantiles = (ranks + rng.random(len(labels))) / counts[labels]
    return np.sort(np.argsort(quantiles, kind="stable")[:n])


def _subset_indices(dataset: datasets.Dataset, n: int | None, seed: int) -> np.ndarray | None:
    """The rows of a stratified subset of `n` examples, or `None` when `n` keeps the whole dataset."""
    if n is None or n >= len(dataset):
        return None
    if n <= 0:
        raise ValueError(f"Subset sizes must be positive, got {n}.")
    return _stratified_indices(_labels(dataset), n, seed)


def _subset(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    picked = _subset_indices(dataset, n, seed)
    return dataset if picked is None else dataset.select(picked)


def random_subset(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """`n` rows of `dataset` drawn at random (fixed by `seed`), in their order; all of them when `n` is None."""
    if n is None or n >= len(dataset):
        return dataset
    picked = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    return dataset.select(np.sort(picked))


def _labels(dataset: datasets.Dataset) -> np.ndarray:
    # Selecting the column first avoids decoding the images; iterating a `Column` is row by row and slow, and so,
    # at about 2.6 us a row, is the numpy formatter: the Arrow column converts in one go (through the indices).
    return dataset.select_columns(["label"]).with_format("arrow")[:].column("label").to_numpy()
