"""Deterministic training views: every augmented image is a pure function of its `ViewKey`.

A training run draws an image's augmentation (crop, flip, RandAugment, erasing) from
`(seed, epoch, index, repeat)` and a batch's Mixup/CutMix (choice, lambda, box) from `(seed, epoch, batch)`,
never from whatever state a process or data-loader worker happens to be in. So:

- resuming after a kill replays exactly the batches the uninterrupted run saw;
- 0, 1 or 16 data-loader workers give the same run;
- a 2-process DDP run sees the same global batches as a 1-process run with the same global batch;
- a teacher's outputs can be computed once per view and replayed.

The keys come from `ViewSampler` (in `sampler.py`), which lays out one global order per epoch. `SeededViews`
wraps any map-style dataset whose transform draws from Python's, NumPy's or torch's global generators (timm and
torchvision transforms do): it seeds all three from the key around each example and restores torch's afterwards,
so the caller's dropout and drop path draw as they would without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

# Distinct streams, so an image's augmentation and its batch's mixing never share a seed.
_VIEW_STREAM, _MIX_STREAM = 0, 1


class ViewKey(NamedTuple):
    """Which view of which example: what a `ViewSampler` yields in place of a plain index.

    Attributes:
        seed: The run's data seed.
        epoch: The epoch (0-based).
        batch: The global batch within the epoch (all processes together, one data-loader step).
        index: The example's index in the dataset.
        repeat: Which copy of the example in this epoch (repeated augmentation), each its own view.
        position: Where the view sits in the epoch's global order. It does not change the view's pixels, but
            with (seed, epoch) it names the mixed image a teacher saw, which is what a teacher cache stores.
    """

    seed: int
    epoch: int
    batch: int
    index: int
    repeat: int = 0
    position: int = 0


def _hash_seed(*values: int) -> int:
    # A stable 63-bit hash (Python's `hash` is salted per process, which would break reproducibility).
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def view_seed(key: ViewKey) -> int:
    """The seed of one example's augmentation: depends on (seed, epoch, index, repeat) only."""
    return _hash_seed(_VIEW_STREAM, key.seed, key.epoch, key.index, key.repeat)


def mix_generator(key: ViewKey) -> np.random.Generator:
    """The generator of one global batch's Mixup/CutMix: depends on (seed, epoch, batch) only."""
    return np.random.default_rng(_hash_seed(_MIX_STREAM, key.seed, key.epoch, key.batch))


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global generators; restore torch's on exit.

    torch's state drives dropout and drop path in the main process, so it must come back (1 us). Python's and
    NumPy's are left seeded by the last view: restoring them costs about 100 us per image (as much as augmenting
    a 28-px image), nothing in training draws from them, and what is left there is still a function of the
    run's keys, so runs stay reproducible.
    """
    torch_state = torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The default CPU generator only: `torch.manual_seed` would also reseed (and initialise) CUDA.
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)


class SeededViews(Dataset):
    """A map-style dataset indexed by `ViewKey`: `views[key]` is `dataset[key.index]` drawn under the key's seed.

    Dict examples get the key under `"view"` so that the collator can mix the batch deterministically;
    `ViewCollator` takes it out again before the batch reaches the model.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ViewKey | int) -> Any:
        if not isinstance(key, ViewKey):
            return self.dataset[key]  # a plain index, e.g. from a user's own sampler: no seed to draw from
        with seeded_global_rngs(view_seed(key)):
            return self._with_key(self.dataset[key.index], key)

    def __getitems__(self, keys: list[ViewKey]) -> list[Any]:
        # Datasets that read rows in batches and transform them one by one (`ImageExamples`) keep their batched
        # read; the seed only has to cover each example's transform.
        batched = hasattr(self.dataset, "read") and hasattr(self.dataset, "transform")
        if not batched or not all(isinstance(key, ViewKey) for key in keys):
            return [self[key] for key in keys]
        examples = []
        for key, row in zip(keys, self.dataset.read([key.index for key in keys]), strict=True):
            with seeded_global_rngs(view_seed(key)):
                examples.append(self._with_key(self.dataset.transform(row), key))
        return examples

    @staticmethod
    def _with_key(example: Any, key: ViewKey) -> Any:
        return {**example, "view": key} if isinstance(example, dict) else example


# The batch entry that carries the examples' keys, a `(B, len(ViewKey._fields))` int64 tensor, when asked for.
VIEW_KEYS = "view_keys"

# Batch entries that stay on the host: the trainer never moves them to the device (a key lookup there would cost
# a device-to-host sync per step). Whoever consumes one pops it before the model sees the batch.
# With `--augment_on device`, the per-sample augmentation parameters (`device_augment`): read on the host to group
# ops, moved by `device_augment.augment_batch` itself.
AUGMENT_PARAMS = "augment_params"
HOST_INPUTS: tuple[str, ...] = (VIEW_KEYS, AUGMENT_PARAMS)


class ViewCollator:
    """Takes each example's `"view"` key out and hands the keys to collators that mix (`accepts_views`).

    With `keep_keys`, the keys also travel with the batch as `batch["view_keys"]` (one row per example, the fields
    of `ViewKey`), for a consumer that must know which views it got (the teacher cache); whoever asks for them
    takes them out before the model.
    """

    def __init__(self, collator: Callable[[list[Any]], Any], keep_keys: bool = False) -> None:
        self.collator = collator
        self.keep_keys = keep_keys

    def __call__(self, examples: list[Any]) -> Any:
        views = [example.pop("view", None) if isinstance(example, dict) else None for example in examples]
        if getattr(self.collator, "accepts_views", False):
            batch = self.collator(examples, views=views)
        else:
            batch = self.collator(examples)
        if self.keep_keys:
            if any(view is None for view in views):
                raise ValueError("keep_keys needs ViewKey-indexed examples (SeededViews with a ViewSampler).")
            batch[VIEW_KEYS] = torch.tensor(views, dtype=torch.long)
        return batch
