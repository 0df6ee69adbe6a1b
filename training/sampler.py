"""`ViewSampler`: one global order of training views per epoch, the same for any number of processes.

The Hugging Face Trainer hands a single sampler to accelerate, which deals the resulting per-process batches
out in turn (batch `i` to process `i % num_processes`). So a sampler that yields one global sequence, fixed by
(seed, epoch), gives every global step the same examples whatever the number of processes: 2 processes with
batches of 16 see, step by step, the 32 examples one process with batches of 32 sees.

Repeated augmentation (Hoffer et al. 2020; DeiT uses 3 copies) is part of that order: each image appears
`num_repeats` times in the epoch, each copy its own view (`ViewKey.repeat`), and the copies share a global batch,
spread over it in a random order. So with several processes they usually land on different processes of the same
step, but not always: timm's `RepeatAugSampler` (DeiT's) deals consecutive copies to consecutive processes, so
there they never share one. Here the order does not depend on the process count at all. An epoch keeps about
`len(dataset)` examples, as in DeiT, cut to whole global batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from .views import ViewKey


class ViewSampler(Sampler[ViewKey]):
    """Yields the `ViewKey`s of an epoch in one global order, fixed by (seed, epoch).

    Args:
        dataset: The training dataset (only its length is used).
        global_batch_size: Examples per data-loader step over all processes (per-device batch x processes);
            the key's `batch` field counts these.
        num_repeats: Copies of each image per epoch (repeated augmentation); 1 disables it.
        shuffle: Shuffle the images each epoch.
        seed: The run's data seed.
        num_distinct_epochs: Epochs after which the views repeat (epoch `e` draws those of `e % n`), for a
            teacher cache of `n` epochs replayed in cycles; `None` never repeats.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        global_batch_size: int,
        num_repeats: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_distinct_epochs: int | None = None,
    ) -> None:
        if global_batch_size < 1 or num_repeats < 1:
            raise ValueError(
                f"global_batch_size and num_repeats must be >= 1, got {global_batch_size} and {num_repeats}."
            )
        self.num_examples = len(dataset)
        self.global_batch_size = global_batch_size
        self.num_repeats = num_repeats
        self.shuffle = shuffle
        self.seed = seed
        self.num_distinct_epochs = num_distinct_epochs
        self.epoch = 0
        if num_repeats > 1 and self.num_examples < global_batch_size:
            raise ValueError(
                f"Repeated augmentation needs at least one global batch per epoch: {self.num_examples} "
                f"examples, global batch {global_batch_size}."
            )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; called by the Trainer (through accelerate) at the start of each epoch."""
        self.epoch = epoch % self.num_distinct_epochs if self.num_distinct_epochs else epoch

    def __len__(self) -> int:
        if self.num_repeats == 1:
            return self.num_examples
        return self.num_examples // self.global_batch_size * self.global_batch_size

    def __iter__(self) -> Iterator[ViewKey]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator) if self.shuffle else None
        if order is None:
            order = torch.arange(self.num_examples)
        repeats = torch.zeros_like(order)
        if self.num_repeats > 1:
            order = order.repeat_interleave(self.num_repeats)[: len(self)]
            repeats = torch.arange(self.num_repeats).repeat(self.num_examples)[: len(self)]
            # Spread the copies over their global batch in a random order: consecutive copies would otherwise
            # sit side by side, and Mixup/CutMix (which pairs neighbours) would mix an image with itself.
            batch_of = torch.arange(len(self)) // self.global_batch_size
            within = torch.argsort(batch_of + torch.rand(len(self), generator=generator))
            order, repeats = order[within], repeats[within]
        for position, (index, repeat) in enumerate(zip(order.tolist(), repeats.tolist(), strict=True)):
            yield ViewKey(self.seed, self.epoch, position // self.global_batch_size, index, repeat, position)
