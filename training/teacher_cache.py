"""The teacher cache: run the frozen teacher once over every training view, replay it in any number of runs.

Every training view and every Mixup/CutMix batch is a pure function of its `ViewKey` (`deit_distill.training.views`), so the
mixed image at global position `p` of epoch `e` is fixed by the run's arguments, and so is the teacher's output
on it. `write_teacher_cache` walks the exact data loader a training run builds (same dataset, transform,
sampler, collator and process layout) for `E` epochs and stores, per view, the teacher's top-K log-probabilities
in the student's class order. A run with the same arguments then reads them back by `(epoch, position)` instead
of running the teacher (`TeacherCache.teacher_logits`); the pixels it trains on are replayed from the keys.

On disk (a folder that loads as a Hub dataset repo; see `CACHE_FORMAT`):

    teacher_cache.json                              what produced the cache (checked field by field) and how
                                                    it is stored; "complete": true once every shard is written
    README.md                                       the dataset card
    data/epoch-00003/process-00000-of-00002/steps-000000-000050.parquet
                                                    one row per view: epoch, position, index, repeat (int),
                                                    topk_indices (K class ids, int16/int32, most likely first),
                                                    topk_log_probs (K log-probabilities, float16/float32)

Each process writes the shards of its own batches (`accelerate launch` parallelises it); a shard covers data-loader
steps `[start, end)` of that process in that epoch and is renamed into place only once written, so a killed run
leaves whole shards only, and a rerun with the same arguments continues after the last one.

Reconstruction (as TinyViT): the K stored probabilities are kept and the remaining mass is spread evenly over the
other classes; with K = all classes the stored log-probabilities are the teacher's distribution. Hard
distillation only needs the stored top-1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from .checkpoints import read_json_file
from .errors import UserError
from .teacher import InputSpec, run_precision
from .views import VIEW_KEYS, ViewKey

logger = logging.getLogger(__name__)

CACHE_FORMAT = "deit-distill-teacher-cache/1"
METADATA_FILE = "teacher_cache.json"
DATA_DIR = "data"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
# Metadata sections that fix the views, their order and the teacher's outputs: compared field by field.
CHECKED_SECTIONS = ("teacher", "labels", "data", "views", "layout")
# The distributions whose code shapes a view (decoding, transforms, RandAugment, the Mixup/CutMix draws, the
# data pipeline). Recorded in the `versions` section; a difference is allowed only when the replayed pixels of
# the first `PIXEL_CHECK_BATCHES` global batches hash equal to the cache's (`pixels` section).
VERSIONED_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "Pillow",
    "numpy",
    "transformers",
    "datasets",
    "deit-distill",
)
PIXEL_CHECK_BATCHES = 2
# Views per parquet row group: the unit a training process reads (16 MiB at K = 1000 in float16).
ROW_GROUP_VIEWS = 4096
_PROCESS = re.compile(r"^process-(\d+)-of-(\d+)$")
_SHARD = re.compile(r"^steps-(\d+)-(\d+)\.parquet$")
_KEY = {name: column for column, name in enumerate(ViewKey._fields)}


def weights_sha256(module: nn.Module) -> str:
    """A hash of a model's parameters and buffers (names, dtypes, shapes, bytes): which teacher it is."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_sha256(dataset: datasets.Dataset, num_images: int = 64) -> str:
    """A content hash of an image dataset: its size, every label and the bytes of `num_images` evenly spaced
    images. Unlike `Dataset._fingerprint` it does not depend on where the files were cached, so a cache pushed to
    the Hub checks out on another machine."""
    digest = hashlib.sha256(f"{len(dataset)};".encode())
    # The labels as one Arrow column (gathered through the dataset's indices, if any), not row by row.
    labels = dataset.select_columns(["label"]).with_format("arrow")[:].column("label")
    digest.update(labels.to_numpy().astype(np.int64).tobytes())
    sample = np.unique(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).astype(int)).tolist()
    rows = dataset.select(sample).select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    for image in rows["image"]:
        data = image.get("bytes")
        if data is None:
            data = Path(image["path"]).read_bytes()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def run_epochs(args: Any, batches_per_epoch: int) -> int:
    """The epochs of data a Trainer run with `args` draws: `num_train_epochs` rounded up, or as many as
    `max_steps` optimizer steps need (the Trainer's own arithmetic)."""
    if args.max_steps > 0:
        updates_per_epoch = max(math.ceil(batches_per_epoch / args.gradient_accumulation_steps), 1)
        return math.ceil(args.max_steps / updates_per_epoch)
    return math.ceil(args.num_train_epochs)


def library_versions() -> dict[str, str | None]:
    """The version of each of `VERSIONED_PACKAGES` as the module states it (torch's with its build, e.g.
    `+cu130`), `None` when one is not installed."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    modules = {"Pillow": "PIL", "deit-distill": None}  # distribution -> module, where the names differ
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        module = modules.get(name, name)
        try:
            versions[name] = importlib.import_module(module).__version__ if module else version(name)
        except (ImportError, PackageNotFoundError):
            versions[name] = None
    return versions


def views_sha256(trainer: Any, num_batches: int = PIXEL_CHECK_BATCHES) -> str:
    """A hash of the first `num_batches` global batches of epoch 0 as `trainer` builds them for training: each
    view drawn from the run's train dataset under its key (`SeededViews`, `ViewSampler`), collated (Mixup/CutMix)
    by the run's train collator, the device augmentation applied on the CPU when the run augments on the device.
    The hash covers the pixels and the (mixed) labels, and does not depend on the process count."""
    from .device_augment import augment_batch
    from .views import AUGMENT_PARAMS, SeededViews, ViewCollator

    views = SeededViews(trainer.train_dataset)
    sampler = trainer._get_train_sampler(views)
    sampler.set_epoch(0)
    collator = ViewCollator(trainer.train_data_collator or trainer.data_collator)
    keys = []
    for key in sampler:
        if key.batch >= num_batches:
            break
        keys.append(key)
    digest = hashlib.sha256()
    for start in range(0, len(keys), sampler.global_batch_size):
        batch = collator(views.__getitems__(keys[start : start + sampler.global_batch_size]))
        pixels = batch["pixel_values"]
        if AUGMENT_PARAMS in batch:
            pixels = augment_batch(pixels, batch[AUGMENT_PARAMS])
        for tensor in (pixels, batch["labels"]):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_run(
    *,
    teacher: nn.Module | None,
    teacher_image_processor: Any,
    student_image_processor: Any,
    labels: list[str],
    train_dataset: datasets.Dataset,
    data_args: Any,
    augmentation_args: Any,
    training_args: Any,
    teacher_id: str | None,
) -> dict[str, Any]:
    """The metadata sections that say which views a run draws and what its teacher makes of them.

    The writer records them and a training run compares its own; `teacher=None` (a run from the cache without
    `--teacher`) leaves the teacher section out of the comparison.
    """
    precision = run_precision(training_args)  # what the teacher runs in (`teacher_autocast`)
    teacher_section = None
    if teacher is not None:
        spec = InputSpec.from_image_processor(teacher_image_processor) if teacher_image_processor else None
        teacher_section = {
            "id": teacher_id,
            "weights_sha256": weights_sha256(teacher),
            "preprocessing": None if spec is None else json.loads(json.dumps(dataclasses.asdict(spec))),
            "precision": precision,
        }
    student_processor = json.loads(student_image_processor.to_json_string())
    return {
        "versions": library_versions(),
        "teacher": teacher_section,
        "labels": list(labels),
        "data": {
            "dataset_name": data_args.dataset_name,
            "dataset_config": data_args.dataset_config,
            "train_split": data_args.train_split,
            "num_examples": len(train_dataset),
            "content_sha256": dataset_sha256(train_dataset),
        },
        "views": {
            "seed": training_args.data_seed if training_args.data_seed is not None else training_args.seed,
            "student_preprocessing": student_processor,
            **{
                name: getattr(augmentation_args, name)
                for name in (
                    "augmentation",
                    "mixup",
                    "cutmix",
                    "mixup_prob",
                    "mixup_switch_prob",
                    "repeated_augmentations",
                )
            },
            # Which path made the views (`--augment_on`); recorded when not the default, so caches written before
            # the flag existed (all `workers`) still replay.
            **(
                {"augment_on": augmentation_args.augment_on}
                if getattr(augmentation_args, "augment_on", "workers") != "workers"
                else {}
            ),
        },
        "layout": {
            "global_batch_size": training_args.per_device_train_batch_size * training_args.world_size,
            "per_device_batch_size": training_args.per_device_train_batch_size,
            "dataloader_drop_last": training_args.dataloader_drop_last,
        },
    }


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}"))
    return flat


def mismatches(cached: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The dotted fields in which a run's description differs from the cache's, as readable lines."""
    lines = []
    for section in CHECKED_SECTIONS:
        if run.get(section) is None and section == "teacher":
            continue  # no --teacher given: nothing to check it against
        expected, actual = _flatten(cached.get(section), section), _flatten(run.get(section), section)
        for field in sorted(expected.keys() | actual.keys()):
            # A teacher is its weights, wherever it is loaded from; see `_pairing_differs` for the batch size.
            if field == "teacher.id" or (
                field == "layout.per_device_batch_size" and not _pairing_differs(cached, run)
            ):
                continue
            if expected.get(field) != actual.get(field):
                lines.append(f"{field}: {expected.get(field)!r} in the cache, {actual.get(field)!r} here")
    return lines


def version_mismatches(cached: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The library versions that differ between the cache's writer and this run, as readable lines."""
    expected, actual = _flatten(cached.get("versions"), "versions"), _flatten(run.get("versions"), "versions")
    return [
        f"{field}: {expected.get(field)!r} in the cache, {actual.get(field)!r} here"
        for field in sorted(expected.keys() | actual.keys())
        if expected.get(field) != actual.get(field)
    ]


def _pairing_differs(cached: dict[str, Any], run: dict[str, Any]) -> bool:
    # Mixup/CutMix pairs neighbours within a process's batch: with even per-device batches the pairs are the
    # global batch's whatever the process count, with an odd one the layout itself must match.
    sizes = (cached["layout"]["per_device_batch_size"], run["layout"]["per_device_batch_size"])
    return sizes[0] != sizes[1] and any(size % 2 for size in sizes)


def expand_top_k(indices: Any, log_probs: Any, num_classes: int) -> torch.Tensor:
    """`(B, C)` log-probabilities from `(B, K)` top-K class ids and log-probabilities (TinyViT's rule).

    The K probabilities are kept and `1 - sum(top-K)` is spread evenly over the other `C - K` classes; with
    K = C this is the stored distribution itself. Usable as teacher logits: the loss takes a softmax of them.
    Built on the host with NumPy (arrays or CPU tensors in, a CPU tensor out): only the K stored entries and one
    value per row are computed, the rest is a fill.
    """
    indices = np.asarray(indices).astype(np.intp, copy=False)
    log_probs = np.asarray(log_probs, dtype=np.float32)
    rows = np.arange(len(indices))[:, None]
    top_k = indices.shape[-1]
    full = np.empty((len(indices), num_classes), dtype=np.float32)
    if top_k == num_classes:
        full[rows, indices] = log_probs
        return torch.from_numpy(full)
    # A top-K that holds all the mass (in float16) leaves 0 for the rest: keep the logs finite.
    tiny = np.finfo(np.float32).tiny
    probs = np.exp(log_probs)
    rest = np.maximum(1.0 - probs.sum(-1, keepdims=True), 0.0) / (num_classes - top_k)
    full[:] = np.log(np.maximum(rest, tiny))
    full[rows, indices] = np.log(np.maximum(probs, tiny))
    return torch.from_numpy(full)


def _read_shard(file: Path) -> pa.Table:
    try:
        return pq.read_table(file)
    except (pa.ArrowException, OSError) as error:
        raise _damaged(file, error) from error


def _damaged(file: Path, error: Exception) -> UserError:
    return UserError(
        f"teacher cache shard {file} is damaged ({str(error).splitlines()[0][:160]}); delete it and rerun "
        "the same `deit-distill cache-teacher` command to write it again."
    )


def check_cache_files(directory: str | os.PathLike) -> None:
    """The cache's own files are readable (its metadata, every shard's footer): one line naming a damaged one."""
    read_metadata(directory)
    check_shards(Path(directory))


def check_shards(directory: Path) -> None:
    """Every shard's footer is readable (a truncated parquet file loses it): fail when the cache is opened, not
    in the middle of training."""
    for file in sorted((directory / DATA_DIR).glob("epoch-*/process-*/steps-*.parquet")):
        try:
            pq.read_metadata(file)
        except (pa.ArrowException, OSError) as error:
            raise _damaged(file, error) from error


@dataclasses.dataclass(frozen=True)
class _RowGroup:
    """One parquet row group of a shard and the positions it holds (from the footer's statistics)."""

    file: Path
    group: int
    first: int  # smallest position
    last: int  # largest position
    offsets: tuple[int, int]  # the writing process's positions within each global batch: [lo, hi)


def _row_groups(folder: Path, global_batch_size: int) -> list[_RowGroup]:
    """The row groups of one epoch's shards, by position, read from the footers only."""
    groups = []
    for file in sorted(folder.glob("process-*/steps-*.parquet")):
        # Process w of W wrote positions [w, w + 1) * global_batch_size / W of each global batch.
        match = _PROCESS.match(file.parent.name)
        offsets = (0, global_batch_size)
        if match and global_batch_size % int(match.group(2)) == 0:
            share = global_batch_size // int(match.group(2))
            offsets = (int(match.group(1)) * share, (int(match.group(1)) + 1) * share)
        try:
            metadata = pq.read_metadata(file)
        except (pa.ArrowException, OSError) as error:
            raise _damaged(file, error) from error
        column = metadata.schema.to_arrow_schema().get_field_index("position")
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:  # a writer without statistics: read it whenever asked
                groups.append(_RowGroup(file, group, 0, np.iinfo(np.int64).max, offsets))
            else:
                groups.append(_RowGroup(file, group, int(stats.min), int(stats.max), offsets))
    if not groups:
        raise UserError(f"teacher cache: no shards in {folder}.")
    return groups


@dataclasses.dataclass
class _Window:
    """One process's rows of global batches `[first, last)` of an epoch, sorted by position."""

    epoch: int
    first: int
    last: int
    offsets: tuple[int, int]  # the process's positions within each global batch: [lo, hi)
    position: np.ndarray  # (n,) int64, sorted
    index: np.ndarray  # (n,) int64
    repeat: np.ndarray  # (n,) int64
    topk_indices: np.ndarray  # (n, K)
    topk_log_probs: np.ndarray  # (n, K)

    def covers(self, epoch: int, batch: int, lo: int, hi: int) -> bool:
        return (
            epoch == self.epoch
            and self.first <= batch < self.last
            and self.offsets[0] <= lo
            and hi <= self.offsets[1]
        )

    @property
    def nbytes(self) -> int:
        arrays = (self.position, self.index, self.repeat, self.topk_indices, self.topk_log_probs)
        return sum(array.nbytes for array in arrays)


def _read_window(
    groups: list[_RowGroup],
    epoch: int,
    first: int,
    last: int,
    offsets: tuple[int, int],
    batch: int,
    top_k: int,
) -> _Window:
    """Read the rows at positions `b * batch + [lo, hi)` for global batches `b` in `[first, last)`: only the
    row groups that hold some of them, and keep only those rows."""
    start, stop = first * batch, last * batch
    wanted = [
        group
        for group in groups
        if group.first < stop
        and group.last >= start
        and group.offsets[0] < offsets[1]
        and offsets[0] < group.offsets[1]
    ]
    by_file: dict[Path, list[int]] = {}
    for group in wanted:
        by_file.setdefault(group.file, []).append(group.group)
    parts = []
    for file, ids in by_file.items():
        try:
            table = pq.ParquetFile(file).read_row_groups(ids)
        except (pa.ArrowException, OSError) as error:
            raise _damaged(file, error) from error
        position = table.column("position").to_numpy()
        offset = position % batch
        keep = (position >= start) & (position < stop) & (offset >= offsets[0]) & (offset < offsets[1])
        if keep.any():
            parts.append(table.filter(pa.array(keep)))
    columns = {name: [] for name in ("position", "index", "repeat", "topk_indices", "topk_log_probs")}
    for part in parts:
        for name in ("position", "index", "repeat"):
            columns[name].append(part.column(name).to_numpy().astype(np.int64))
        for name in ("topk_indices", "topk_log_probs"):
            columns[name].append(
                part.column(name).combine_chunks().flatten().to_numpy().reshape(len(part), top_k)
            )
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return _Window(
            epoch, first, last, offsets, empty, empty, empty, np.zeros((0, top_k)), np.zeros((0, top_k))
        )
    merged = {name: np.concatenate(values) for name, values in columns.items()}
    order = np.argsort(merged["position"], kind="stable")
    return _Window(epoch, first, last, offsets, *(merged[name][order] for name in columns))


class TeacherCache:
    """A complete teacher cache, read for training: teacher outputs by `(epoch, position)`.

    A process reads only its own rows (its positions within each global batch, taken from its keys), a window of
    global batches at a time: the row groups whose position range meets the window, chosen from the shards'
    footers. The next window is read ahead in a background thread while the current one serves; at most two are
    held, each about `window_bytes`, whatever the epoch's size.

    Args:
        directory: The cache folder (`teacher_cache.json` and `data/`).
        cycle: Allow a run longer than the cache: epoch `e` replays cached epoch `e % epochs`, views and
            teacher outputs both (the trainer's sampler is told to cycle too).
        window_bytes: About how much of the cache one window holds in memory.
    """

    def __init__(
        self, directory: str | os.PathLike, *, cycle: bool = False, window_bytes: int = 64 * 2**20
    ) -> None:
        self.directory = Path(directory)
        self.metadata = read_metadata(self.directory)
        if not self.metadata.get("complete"):
            raise UserError(
                f"teacher cache {self.directory} is incomplete (a cache-teacher run was interrupted): rerun the "
                "same `deit-distill cache-teacher` command to finish it."
            )
        check_shards(self.directory)
        storage = self.metadata["storage"]
        self.epochs: int = storage["epochs"]
        self.top_k: int = storage["top_k"]
        self.num_classes: int = storage["num_classes"]
        self.global_batch_size: int = self.metadata["layout"]["global_batch_size"]
        self.cycle = cycle
        self.version_differences: list[str] = version_mismatches(
            self.metadata, {"versions": library_versions()}
        )
        self._pixels_checked = False
        value_bytes = np.dtype(DTYPES[storage["dtype"]][0]).itemsize
        # Per row in memory: position, index, repeat (int64) and K class ids and values.
        self._row_bytes = 24 + self.top_k * (value_bytes + 4)
        self.window_rows = max(1, window_bytes // self._row_bytes)
        self._groups: tuple[int, list[_RowGroup]] | None = None
        self._window: _Window | None = None
        self._ahead: tuple[tuple[int, int, int, tuple[int, int]], Future] | None = None
        self._reader: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers may pickle the trainer's state: the reader thread and windows stay here.
        state = self.__dict__.copy()
        state.update(_groups=None, _window=None, _ahead=None, _reader=None)
        return state

    @property
    def teacher_id(self) -> str | None:
        return (self.metadata.get("teacher") or {}).get("id")

    @property
    def held_bytes(self) -> int:
        """Bytes of teacher outputs held now (the current window and the one read ahead, once read)."""
        held = self._window.nbytes if self._window is not None else 0
        if self._ahead is not None and self._ahead[1].done() and self._ahead[1].exception() is None:
            held += self._ahead[1].result().nbytes
        return held

    def check(self, run: dict[str, Any]) -> None:
        """Raise a `UserError` naming every field in which `run` (from `describe_run`) differs from the cache."""
        lines = mismatches(self.metadata, run)
        # Other library versions may still draw the same views: `check_pixels` decides, from the pixels.
        self.version_differences = version_mismatches(self.metadata, run)
        if lines:
            raise UserError(
                f"--teacher_cache {self.directory} was written for other views or another teacher; it cannot "
                "stand in for this run's teacher. Differing fields: "
                + "; ".join(lines)
                + ". Train with the cache's arguments, or write a cache for these (deit-distill cache-teacher)."
            )

    def check_pixels(self, trainer: Any) -> None:
        """Replay the first cached batches with `trainer`'s own pipeline and compare their hash with the cache's.

        Equal pixels with other library versions are accepted, and said so in the log; other pixels are refused
        naming the versions that differ. Checked once per cache object."""
        if self._pixels_checked:
            return
        cached = self.metadata.get("pixels") or {}
        batches = cached.get("batches", PIXEL_CHECK_BATCHES)
        actual = views_sha256(trainer, batches)
        if actual == cached.get("sha256"):
            if self.version_differences:
                logger.info(
                    "teacher cache %s was written with other library versions (%s), but the first %d batches' "
                    "pixels hash equal to the cache's: replaying it.",
                    self.directory,
                    "; ".join(self.version_differences),
                    batches,
                )
            self._pixels_checked = True
            return
        lines = [
            *self.version_differences,
            f"pixels.sha256: {cached.get('sha256')!r} in the cache, {actual!r} here",
        ]
        raise UserError(
            f"--teacher_cache {self.directory} replays other pixels here: its first {batches} batches hash "
            "differently. Differing fields: " + "; ".join(lines) + ". Install the versions the cache was "
            "written with, or write a cache here (deit-distill cache-teacher)."
        )

    def check_epochs(self, epochs: int) -> None:
        """A run that draws more epochs than cached needs `cycle`."""
        if epochs > self.epochs and not self.cycle:
            raise UserError(
                f"--teacher_cache {self.directory} holds {self.epochs} epoch(s) of views but this run draws "
                f"{epochs}. Cache more epochs (cache-teacher --cache_epochs {epochs}), train fewer, or replay the "
                "cached epochs in cycles with --cache_cycle true."
            )

    def _epoch_groups(self, epoch: int) -> list[_RowGroup]:
        if self._groups is None or self._groups[0] != epoch:
            if not 0 <= epoch < self.epochs:
                raise UserError(
                    f"teacher cache {self.directory} has no epoch {epoch} (it holds {self.epochs})."
                )
            folder = self.directory / DATA_DIR / f"epoch-{epoch:05d}"
            self._groups = (epoch, _row_groups(folder, self.global_batch_size))
        return self._groups[1]

    def _window_for(self, epoch: int, batch: int, offsets: tuple[int, int]) -> _Window:
        if self._window is not None and self._window.covers(epoch, batch, *offsets):
            return self._window
        steps = max(1, self.window_rows // (offsets[1] - offsets[0]))
        request = (epoch, batch, batch + steps, offsets)
        if self._ahead is not None and self._ahead[0] == request:
            window = self._ahead[1].result()
        else:
            window = self._read_request(request)
        self._window, self._ahead = window, None
        # Read the next window of this epoch while this one serves (parquet decoding releases the GIL).
        groups = self._epoch_groups(epoch)
        if any(group.last >= window.last * self.global_batch_size for group in groups):
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="teacher-cache")
            following = (epoch, window.last, window.last + steps, offsets)
            self._ahead = (following, self._reader.submit(self._read_request, following, groups))
        return window

    def _read_request(
        self, request: tuple[int, int, int, tuple[int, int]], groups: list[_RowGroup] | None = None
    ) -> _Window:
        epoch, first, last, offsets = request
        groups = groups if groups is not None else self._epoch_groups(epoch)
        return _read_window(groups, epoch, first, last, offsets, self.global_batch_size, self.top_k)

    def teacher_logits(self, view_keys: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
        """Teacher logits (log-probabilities) for one process's batch, from its `(B, 6)` view keys.

        A host tensor built with NumPy: the caller moves it to the device, once. `hard=True` returns the one-hot
        of the stored top-1, all hard distillation uses (its argmax). Raises when the keys are not the views the
        cache was written for.
        """
        keys = view_keys.numpy() if view_keys.device.type == "cpu" else view_keys.cpu().numpy()
        epochs = np.unique(keys[:, _KEY["epoch"]])
        batches = np.unique(keys[:, _KEY["batch"]])
        if len(epochs) != 1 or len(batches) != 1:
            raise UserError(
                "teacher cache: a batch mixes views of several global batches (accelerate padded the last batch "
                "of an epoch); train with --dataloader_drop_last true, with the cache written the same way."
            )
        epoch, batch = int(epochs[0]), int(batches[0])
        position = keys[:, _KEY["position"]].astype(np.int64)
        offset = position - batch * self.global_batch_size
        if offset.min() < 0 or offset.max() >= self.global_batch_size:
            raise UserError(
                f"teacher cache {self.directory}: the views of this run are not those of the cache (another "
                "seed, dataset or batch layout)."
            )
        window = self._window_for(epoch, batch, (int(offset.min()), int(offset.max()) + 1))
        rows = np.searchsorted(window.position, position)
        found = rows < len(window.position)
        if not found.all() or not np.array_equal(window.position[rows], position):
            raise UserError(f"teacher cache {self.directory} has no entry for some views of epoch {epoch}.")
        if not (
            np.array_equal(window.index[rows], keys[:, _KEY["index"]])
            and np.array_equal(window.repeat[rows], keys[:, _KEY["repeat"]])
            and (keys[:, _KEY["seed"]] == self.metadata["views"]["seed"]).all()
        ):
            raise UserError(
                f"teacher cache {self.directory}: the views of this run are not those of the cache (another "
                "seed, dataset or batch layout)."
            )
        indices = window.topk_indices[rows]
        if hard:
            targets = np.zeros((len(rows), self.num_classes), dtype=np.float32)
            targets[np.arange(len(rows)), indices[:, 0]] = 1.0
            return torch.from_numpy(targets)
        return expand_top_k(indices, window.topk_log_probs[rows], self.num_classes)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise UserError(
            f"--teacher_cache {directory}: no {METADATA_FILE}; write one with deit-distill cache-teacher."
        )
    metadata = read_json_file(path, "teacher cache")
    if metadata.get("format") != CACHE_FORMAT:
        raise UserError(
            f"teacher cache {directory}: format {metadata.get('format')!r}, expected {CACHE_FORMAT!r}."
        )
    return metadata


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def _done_steps(folder: Path) -> int:
    """Steps `[0, n)` this process has whole shards for in one epoch (shards are written in order)."""
    ranges = sorted(
        (int(match.group(1)), int(match.group(2)))
        for path in folder.glob("steps-*.parquet")
        if (match := _SHARD.match(path.name))
    )
    done = 0
    for start, end in ranges:
        if start != done:
            break
        done = end
    return done


class _ShardWriter:
    """Buffers one process's rows of one epoch and writes them as whole, atomically renamed shards."""

    def __init__(self, folder: Path, start: int, value_type: pa.DataType, top_k: int) -> None:
        self.folder, self.start, self.value_type, self.top_k = folder, start, value_type, top_k
        self.rows: list[dict[str, np.ndarray]] = []

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.rows.append(columns)

    def __len__(self) -> int:
        return sum(len(columns["position"]) for columns in self.rows)

    def flush(self, end: int) -> None:
        columns = {name: np.concatenate([row[name] for row in self.rows]) for name in self.rows[0]}
        table = pa.table(
            {
                "epoch": pa.array(columns["epoch"], pa.int32()),
                "position": pa.array(columns["position"], pa.int64()),
                "index": pa.array(columns["index"], pa.int64()),
                "repeat": pa.array(columns["repeat"], pa.int16()),
                "topk_indices": _fixed_lists(columns["topk_indices"], self.top_k),
                "topk_log_probs": _fixed_lists(columns["topk_log_probs"], self.top_k, self.value_type),
            }
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"steps-{self.start:06d}-{end:06d}.parquet"
        partial = path.with_suffix(".partial")
        # Small row groups: a reader picks the ones that hold its own positions (see `TeacherCache`).
        # Dictionary-encoded class ids (at most `num_classes` values: smaller), plain log-probabilities (as many
        # values as views: a dictionary saves nothing and makes them ~8x slower to decode at K = all).
        pq.write_table(
            table,
            partial,
            row_group_size=ROW_GROUP_VIEWS,
            use_dictionary=["topk_indices.list.element", "epoch", "repeat"],
        )
        os.replace(partial, path)
        self.rows, self.start = [], end


def _fixed_lists(values: np.ndarray, size: int, value_type: pa.DataType | None = None) -> pa.Array:
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, size)


def write_teacher_cache(
    trainer: Any,
    directory: str | os.PathLike,
    run: dict[str, Any],
    *,
    epochs: int | None = None,
    top_k: int | None = None,
    dtype: str = "float16",
    shard_views: int = 50_000,
) -> dict[str, Any]:
    """Run `trainer`'s teacher over every training view of `epochs` epochs and store its top-K; returns the
    metadata.

    `trainer` is the `DistillationTrainer` the training run would build (with its teacher), so the views, their
    order, the per-process batches and the teacher's input adaptation are the training run's own. `run` is its
    `describe_run`. `top_k=None` stores min(10, classes), 0 stores all classes. Call it in every process under
    `accelerate launch`; each writes its own shards. Rerun with the same arguments to finish an interrupted cache.
    """
    if dtype not in DTYPES:
        raise UserError(f"--cache_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    trainer.keep_view_keys = True
    loader = trainer.get_train_dataloader()
    num_classes = len(run["labels"])
    top_k = min(10, num_classes) if top_k is None else (num_classes if top_k == 0 else top_k)
    if not 1 <= top_k <= num_classes:
        raise UserError(f"--cache_top_k must be in [0, {num_classes}] (0: all classes), got {top_k}.")
    epochs = run_epochs(trainer.args, len(loader)) if epochs is None else epochs
    directory = Path(directory)
    metadata = {
        "format": CACHE_FORMAT,
        **run,
        "pixels": {"batches": PIXEL_CHECK_BATCHES, "sha256": views_sha256(trainer, PIXEL_CHECK_BATCHES)},
        "storage": {
            "epochs": epochs,
            "top_k": top_k,
            "num_classes": num_classes,
            "dtype": dtype,
            "writer_processes": world,
            "shard_views": shard_views,
        },
        "complete": False,
    }
    _start_or_resume(directory, metadata, rank == 0)
    accelerator.wait_for_everyone()

    value_dtype, value_type = DTYPES[dtype]
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    for epoch in range(epochs):
        folder = directory / DATA_DIR / f"epoch-{epoch:05d}" / f"process-{rank:05d}-of-{world:05d}"
        done = _done_steps(folder)
        if done >= len(loader):
            continue
        epoch_loader = _skip_first_batches(loader, done)
        epoch_loader.set_epoch(epoch)
        writer = _ShardWriter(folder, done, value_type, top_k)
        for step, batch in enumerate(epoch_loader, start=done):
            keys = batch.pop(VIEW_KEYS).cpu().numpy()
            if (keys[:, _KEY["epoch"]] != epoch).any():
                raise RuntimeError(f"the data loader yielded views of another epoch than {epoch}")
            # `_prepare_inputs`: the one crossing to the device (and, with --augment_on device, the augmentation).
            logits = trainer.teacher_logits(trainer._prepare_inputs(batch)["pixel_values"]).float()
            values, indices = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
            # Views that accelerate repeats to pad a process's last batch were mixed in another global batch
            # than their own: not theirs to store (the original is stored where it was drawn).
            own = keys[:, _KEY["batch"]] == keys[0, _KEY["batch"]]
            writer.add(
                {
                    "epoch": keys[own, _KEY["epoch"]],
                    "position": keys[own, _KEY["position"]],
                    "index": keys[own, _KEY["index"]],
                    "repeat": keys[own, _KEY["repeat"]],
                    "topk_indices": indices.cpu().numpy()[own].astype(index_dtype),
                    "topk_log_probs": values.cpu().numpy()[own].astype(value_dtype),
                }
            )
            if len(writer) >= shard_views or step + 1 == len(loader):
                writer.flush(step + 1)
        logger.info("teacher cache: epoch %d of %d written by process %d", epoch + 1, epochs, rank)
    accelerator.wait_for_everyone()
    if rank == 0:
        metadata["storage"]["views_per_epoch"] = _check_complete(directory, epochs)
        metadata["complete"] = True
        _write_json(directory / METADATA_FILE, metadata)
        write_dataset_card(directory)
    accelerator.wait_for_everyone()
    return metadata


def _skip_first_batches(loader: Any, done: int) -> Any:
    if not done:
        return loader
    from accelerate import skip_first_batches

    return skip_first_batches(loader, done)


def _start_or_resume(directory: Path, metadata: dict[str, Any], is_main: bool) -> None:
    if (directory / METADATA_FILE).is_file():
        existing = read_metadata(directory)
        lines = mismatches(existing, metadata) + version_mismatches(existing, metadata)
        if existing.get("pixels") != metadata["pixels"]:
            lines.append(f"pixels: {existing.get('pixels')!r} in the cache, {metadata['pixels']!r} here")
        lines += [
            f"storage.{name}: {existing['storage'].get(name)!r} in the cache, {value!r} here"
            for name, value in metadata["storage"].items()
            if existing["storage"].get(name) != value and name != "views_per_epoch"
        ]
        if lines:
            raise UserError(
                f"--teacher_cache {directory} holds a cache written with other arguments; choose another folder "
                "or remove it. Differing fields: " + "; ".join(lines) + "."
            )
        if existing.get("complete"):
            logger.info("teacher cache %s is already complete.", directory)
        return
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / METADATA_FILE, metadata)


def _check_complete(directory: Path, epochs: int) -> int:
    """Every epoch holds the same positions, each once; returns the views per epoch."""
    counts = set()
    for epoch in range(epochs):
        files = sorted((directory / DATA_DIR / f"epoch-{epoch:05d}").glob("process-*/steps-*.parquet"))
        position = pa.concat_arrays(
            [pq.read_table(file, columns=["position"]).column("position").combine_chunks() for file in files]
        ).to_numpy()
        if len(np.unique(position)) != len(position) or position.max() + 1 != len(position):
            raise RuntimeError(f"teacher cache epoch {epoch}: positions are missing or written twice")
        counts.add(len(position))
    if len(counts) != 1:
        raise RuntimeError(f"teacher cache epochs hold different numbers of views: {sorted(counts)}")
    return counts.pop()


def write_dataset_card(directory: str | os.PathLike) -> Path:
    """The cache's README.md: Hub dataset-card metadata (the parquet files as one split) and what produced it."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    storage, teacher, data, views = (
        metadata["storage"],
        metadata["teacher"] or {},
        metadata["data"],
        metadata["views"],
    )
    # Local paths of the writing machine stay out of the card: a folder name, said to be local.
    teacher_name = _card_name(teacher.get("id"), "model")
    dataset_name = _card_name(data["dataset_name"], "dataset")
    card = f"""---
tags:
- deit-distill
- knowledge-distillation
- teacher-cache
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_DIR}/*/*/*.parquet
---

# Teacher cache: {teacher_name} on {dataset_name}

The outputs of a frozen teacher on every training view of {storage["epochs"]} epoch(s) of a
[deit-distill](https://github.com/) run, so that runs with the same data arguments train without running the
teacher (`deit-distill train ... --teacher_cache DIR`). Each row is one view: `epoch`, `position` (in the
epoch's global order), `index` (the example), `repeat` (its copy), and the teacher's top-{storage["top_k"]}
classes (`topk_indices`, most likely first) with their log-probabilities (`topk_log_probs`,
{storage["dtype"]}), in the student's class order. The view's pixels are not stored: they are a pure function of
(seed, epoch, index, repeat) and of the batch's Mixup/CutMix draw, and are replayed at training time.

| | |
|---|---|
| teacher | {teacher_name} (weights sha256 `{str(teacher.get("weights_sha256"))[:16]}...`, {teacher.get("precision")}) |
| data | {dataset_name} ({data["dataset_config"] or "default"}), split `{data["train_split"]}`, {data["num_examples"]} images |
| views | seed {views["seed"]}, augmentation `{views["augmentation"]}`, mixup {views["mixup"]}, cutmix {views["cutmix"]}, repeated augmentation {views["repeated_augmentations"]} |
| layout | global batch {metadata["layout"]["global_batch_size"]} |
| storage | {storage.get("views_per_epoch")} views per epoch, top-{storage["top_k"]} of {storage["num_classes"]} classes |

`{METADATA_FILE}` holds everything a training run checks before using the cache; a run whose views would differ
in any field is refused with the field named.

```python
from datasets import load_dataset

views = load_dataset("parquet", data_files="{DATA_DIR}/*/*/*.parquet", split="train")
```
"""
    path = directory / "README.md"
    path.write_text(card)
    return path


def _card_name(name: str | None, what: str) -> str:
    """A Hub id as it is, a local path by its folder name and said to be local."""
    from .run_record import is_local

    if not name:
        return "an unnamed " + what
    if name == "fashion_mnist" or not is_local(name):
        return f"`{name}`"
    return f"`{Path(name).name}` (a local {what}, not on the Hub)"


def open_for_run(
    directory: str | os.PathLike,
    *,
    cycle: bool,
    teacher_id: str | None,
    student_image_processor: Any,
    labels: list[str],
    train_dataset: datasets.Dataset,
    data_args: Any,
    augmentation_args: Any,
    training_args: Any,
) -> TeacherCache:
    """The cache a training run reads, checked against the run's own description (`describe_run`).

    A `teacher_id` is loaded (not run) to check its weights and preprocessing against the cached teacher's.
    """
    from .teacher import load_teacher, load_teacher_image_processor

    cache = TeacherCache(directory, cycle=cycle)
    cache.check(
        describe_run(
            teacher=load_teacher(teacher_id) if teacher_id else None,
            teacher_image_processor=load_teacher_image_processor(teacher_id) if teacher_id else None,
            student_image_processor=student_image_processor,
            labels=labels,
            train_dataset=train_dataset,
            data_args=data_args,
            augmentation_args=augmentation_args,
            training_args=training_args,
            teacher_id=teacher_id,
        )
    )
    return cache


def push_teacher_cache(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Upload a complete cache as a Hub dataset repo (card, metadata, shards); returns the commit URL."""
    from huggingface_hub import HfApi

    cache = TeacherCache(directory)  # refuses an incomplete cache
    card = cache.directory / "README.md"
    if not card.is_file():
        write_dataset_card(cache.directory)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    commit = api.upload_folder(
        folder_path=cache.directory,
        repo_id=repo_id,
        repo_type="dataset",
        revision=revision,
        allow_patterns=["README.md", METADATA_FILE, f"{DATA_DIR}/**/*.parquet"],
        commit_message=f"Teacher cache: {cache.epochs} epoch(s), top-{cache.top_k}",
    )
    return commit.commit_url
