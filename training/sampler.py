"""Repeated augmentation (Hoffer et al. 2020), as DeiT uses it: each image appears `num_repeats` times per
epoch, each copy in the same step on a different process, under a different random augmentation.

timm's `RepeatAugSampler` (from the DeiT repo) yields one process's share. The Hugging Face Trainer, though,
hands a single sampler to accelerate, which deals the resulting batches out to the processes in turn
(batch `i` to process `i % num_processes`). `RepeatedAugmentationSampler` therefore lays the per-process
shares of timm's sampler out in that order, so each process receives exactly the batches timm's sampler
would give it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler

# Spaces the seeds so different runs never share an epoch's order (for the first 100000 epochs).
_EPOCHS_PER_SEED = 100_000


class RepeatedAugmentationSampler(Sampler[int]):
    """Global-order repeated-augmentation sampler for a DataLoader that accelerate shards by batch.

    Every process gets the batches of `timm.data.distributed_sampler.RepeatAugSampler(rank=process)`: the
    copies of an image land on different processes, and an epoch has about `len(dataset) / num_processes`
    examples per process, like an epoch without repetition. Each process's share is cut to whole batches so
    the interleaving stays aligned (at most `batch_size - 1` examples per process dropped per epoch).

    Args:
        dataset: The training dataset (only its length is used).
        num_processes: Number of data-parallel processes.
        batch_size: Per-process batch size of the DataLoader.
        num_repeats: Copies of each image per epoch (3 in DeiT).
        shuffle: Shuffle the images each epoch.
        seed: Base seed; the order depends on the seed and the epoch (see `set_epoch`).
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_processes: int,
        batch_size: int,
        num_repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if num_processes < 1 or batch_size < 1 or num_repeats < 1:
            raise ValueError(
                f"num_processes, batch_size and num_repeats must be >= 1, got {num_processes}, {batch_size}, "
                f"{num_repeats}."
            )
        self.shards = [
            RepeatAugSampler(
                dataset, num_replicas=num_processes, rank=rank, shuffle=shuffle, num_repeats=num_repeats
            )
            for rank in range(num_processes)
        ]
        self.batch_size = batch_size
        self.batches_per_process = len(self.shards[0]) // batch_size
        if self.batches_per_process == 0:
            raise ValueError(
                f"With {len(dataset)} examples over {num_processes} processes, each process gets "
                f"{len(self.shards[0])} examples per epoch, fewer than one batch of {batch_size}."
            )
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; called by the Trainer (through accelerate) at the start of each epoch."""
        for shard in self.shards:
            shard.set_epoch(self.seed * _EPOCHS_PER_SEED + epoch)

    def __iter__(self) -> Iterator[int]:
        shares = [list(shard) for shard in self.shards]
        for step in range(self.batches_per_process):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            for share in shares:
                yield from share[batch]

    def __len__(self) -> int:
        return self.batches_per_process * self.batch_size * len(self.shards)
