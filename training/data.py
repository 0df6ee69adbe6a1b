"""Image-classification datasets as a `DatasetDict` with splits "train" and "validation".

Every source comes out the same way: an `image` column (`datasets.Image`, decodes to PIL) and a `label`
column (`datasets.ClassLabel`, with class names), whatever the source called them. Decoding goes through
`decode_image`, which turns every image mode into upright RGB with `to_rgb` (the function the saved pipeline
uses, so inference sees the same pixels) and names the file and index when an image is corrupt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

# One conversion for training, eval and the shipped pipeline; re-exported here as part of the data API.
from deit_distill.modeling_deit_distill.pipeline_deit_distill import to_rgb

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


class CorruptImageError(ValueError):
    """An image that PIL cannot decode; the message names the dataset index and the file when known."""


def load_image_dataset(
    source: str,
    *,
    config_name: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_subset: int | None = None,
    eval_subset: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load an image-classification dataset with splits "train" and "validation".

    Args:
        source: "fashion_mnist" (read from the Debian package `dataset-fashion-mnist`, no network), a local
            directory (of images, one sub-folder per class, or of data files such as parquet), or a Hub
            dataset id.
        config_name: Hub dataset configuration.
        train_split: Split used for training.
        eval_split: Split used for evaluation. By default the first of "validation", "valid", "val", "test"
            that exists; without any, `eval_fraction` of the training split is held out (stratified by label,
            fixed by `seed`).
        image_column, label_column: Column names in the source; renamed to "image" and "label".
        train_subset, eval_subset: Keep this many examples of each split, stratified by label and fixed by
            `seed` (for quick runs).
        eval_fraction: Share of the training split held out when the source has no evaluation split.
        seed: Seed of the held-out split and of the subsets.
        cache_dir: Cache directory for `datasets` (and for the converted Fashion-MNIST).

    Returns:
        The splits; its `eval_split_used` attribute names the source of "validation" (e.g. "test", or
        "train (held out 10%)"), and `unpicked_train` holds the training rows that `train_subset` left out
        (`None` without a subset), which can serve as unlabelled images (`with_unlabeled`).
    """
    if source == FASHION_MNIST:
        raw = _load_fashion_mnist(FASHION_MNIST_DIR, cache_dir)
    else:
        # A local folder of images loads as `imagefolder` (labels from sub-folder names), a folder of
        # parquet/csv/... with the matching builder, anything else as a Hub dataset id.
        raw = datasets.load_dataset(source, config_name, cache_dir=cache_dir)

    if train_split not in raw:
        raise ValueError(
            f"{source!r} has no split {train_split!r}; available splits: {list(raw)}. Set --train_split."
        )
    if eval_split is None:
        eval_split = next(
            (name for name in EVAL_SPLIT_CANDIDATES if name in raw and name != train_split), None
        )
    elif eval_split not in raw:
        raise ValueError(
            f"{source!r} has no split {eval_split!r}; available splits: {list(raw)}. Set --eval_split."
        )

    splits = {"train": raw[train_split]}
    if eval_split is not None:
        splits["validation"] = raw[eval_split]
    for name, dataset in splits.items():
        splits[name] = _canonical_columns(dataset, image_column, label_column, source, name)
    splits = _as_class_labels(splits)

    if "validation" not in splits:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
        train = splits["train"]
        held_out = _stratified_indices(_labels(train), round(len(train) * eval_fraction), seed)
        keep = np.setdiff1d(np.arange(len(train)), held_out)
        splits = {"train": train.select(keep), "validation": train.select(held_out)}

    full_train, unpicked = splits["train"], None
    picked = _subset_indices(full_train, train_subset, seed)
    if picked is not None:
        splits["train"] = full_train.select(picked)
        unpicked = full_train.select(np.setdiff1d(np.arange(len(full_train)), picked))
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
    image_column: str = "image",
    subset: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Images without labels, as a dataset with one `image` column.

    Args:
        source: "fashion_mnist", a local folder (of images, flat or in sub-folders, whose names are ignored; or
            of data files) or a Hub dataset id.
        split, image_column, config_name, cache_dir: As in `load_image_dataset`.
        subset: Keep this many images, drawn at random (fixed by `seed`).
    """
    if source == FASHION_MNIST:
        raw = _load_fashion_mnist(FASHION_MNIST_DIR, cache_dir)
    elif os.path.isdir(os.path.expanduser(source)) and _holds_images_only(os.path.expanduser(source)):
        # `drop_labels`: sub-folder names are not labels here (and a flat folder has none).
        raw = datasets.load_dataset(
            "imagefolder", data_dir=os.path.expanduser(source), drop_labels=True, cache_dir=cache_dir
        )
    else:
        raw = datasets.load_dataset(source, config_name, cache_dir=cache_dir)
    if split not in raw:
        raise ValueError(
            f"{source!r} has no split {split!r}; available splits: {list(raw)}. Set --unlabeled_split."
        )
    dataset = raw[split]
    if image_column not in dataset.column_names:
        raise ValueError(
            f"Split {split!r} of {source!r} has no column {image_column!r}; available columns: "
            f"{dataset.column_names}. Set --unlabeled_image_column."
        )
    dataset = dataset.select_columns([image_column]).rename_columns({image_column: "image"})
    if dataset.features["image"] != datasets.Image():
        dataset = dataset.cast_column("image", datasets.Image())
    return random_subset(dataset, subset, seed)


def with_unlabeled(train: datasets.Dataset, unlabeled: datasets.Dataset) -> datasets.Dataset:
    """`train` followed by the `unlabeled` images, labelled `UNLABELED` under `train`'s label feature."""
    if not len(unlabeled):
        return train
    unlabeled = unlabeled.select_columns(["image"]).add_column("label", [UNLABELED] * len(unlabeled))
    unlabeled = unlabeled.cast(train.features)
    return datasets.concatenate_datasets([train, unlabeled])


def count_unlabeled(dataset: datasets.Dataset) -> int:
    """How many examples of `dataset` have no label (`UNLABELED`)."""
    return int((_labels(dataset) == UNLABELED).sum()) if len(dataset) else 0


def _holds_images_only(folder: str) -> bool:
    """Whether every file under `folder` (hidden ones aside) is an image that `imagefolder` reads."""
    extensions = datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
    for _, _, files in os.walk(folder):
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() not in extensions:
                return False
    return True


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
        # `open` only reads the header; `load` decodes the pixels, where truncated files fail.
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        location = [f"index {index}"] if index is not None else []
        if path:
            location.append(f"file {path!r}")
        raise CorruptImageError(
            f"Cannot decode image ({', '.join(location) or 'location unknown'}): {type(error).__name__}: "
            f"{error}. Remove or replace it, or drop corrupt images before training with "
            "scan_images(dataset, on_error='skip')."
        ) from error


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
    for column, flag in ((image_column, "--image_column"), (label_column, "--label_column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"Split {split!r} of {source!r} has no column {column!r}; available columns: "
                f"{dataset.column_names}. Set {flag}."
            )
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    if dataset.features["image"] != datasets.Image():
        # File paths, or an `Image(decode=False)` column.
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def _as_class_labels(splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Give every split the same `ClassLabel` label feature (integer labels get names "0", "1", ...)."""
    feature = splits["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        class_label = feature
    elif isinstance(feature, datasets.Value) and feature.dtype == "string":
        values = set().union(*(dataset.unique("label") for dataset in splits.values()))
        class_label = datasets.ClassLabel(names=sorted(values))
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        top = max(max(dataset.unique("label")) for dataset in splits.values())
        class_label = datasets.ClassLabel(names=[str(i) for i in range(top + 1)])
    else:
        raise ValueError(f"The label column must hold class indices or names, got {feature}.")
    for name, dataset in splits.items():
        if (
            isinstance(dataset.features["label"], datasets.ClassLabel)
            and dataset.features["label"] != class_label
        ):
            raise ValueError(
                f"The {name} split's classes {dataset.features['label'].names} differ from the train split's "
                f"{class_label.names}; both splits must share one label space."
            )
        if dataset.features["label"] != class_label:
            # Casting maps names to indices for string labels, and only relabels the feature for integers.
            splits[name] = dataset = dataset.cast_column("label", class_label)
        if len(dataset) and min(dataset.unique("label")) < 0:
            raise ValueError(
                f"The {name} split has unlabelled examples (label -1); choose another split with --eval_split "
                "or --train_split."
            )
    return splits


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
    # Selecting the column first avoids decoding the images; iterating a `Column` is row by row and slow.
    return dataset.select_columns(["label"]).with_format("numpy")[:]["label"]
