"""Deterministic, sharded, resumable batches from a map-style dataset.

The order of an epoch is a permutation drawn from `(seed, epoch)`. Global batch `b` of the run
takes permutation slots `[b*B, (b+1)*B)` of its epoch, and worker `r` of `W` takes every W-th slot
of those, so no two workers see the same sample in an epoch and the samples of a step do not depend
on the number of workers. The data position is therefore just the number of global batches
consumed, which the checkpoint stores; resuming at batch k replays nothing and skips nothing.
An epoch's tail that does not fill a global batch is dropped.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ShardedBatches:
    """Iterate this worker's part of each global batch, starting at global batch `start`."""

    def __init__(self, dataset: Dataset, global_batch: int, rank: int, world_size: int,
                 seed: int, start: int = 0):
        assert global_batch % world_size == 0, "checked by the spec"
        self.dataset, self.global_batch = dataset, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch "
                             f"of {global_batch}; lower train.batch_size or provide more data")
        self.position = start
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=g)
        return self._perm

    def indices(self, batch: int) -> list[int]:
        """Dataset indices this worker reads for global batch number `batch`."""
        epoch, within = divmod(batch, self.batches_per_epoch)
        perm = self._permutation(epoch)
        slots = perm[within * self.global_batch:(within + 1) * self.global_batch]
        return slots[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            idx = self.indices(self.position)
            self.position += 1
            yield collate([self.dataset[i] for i in idx])


def eval_batches(dataset: Dataset, global_batch: int, rank: int, world_size: int,
                 num_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """`num_batches` fixed global batches of the validation set, sharded like training.

    Their samples are spread evenly over the whole set, not its first `num_batches` batches: a
    validation split cut from a corpus in order (the code corpus's files, a simulated trajectory)
    is not shuffled, so its beginning is one file or one stretch of time. Every evaluation (and every
    world size) sees the same samples; rank r takes the r-th slice of each global batch."""
    per_worker = global_batch // world_size
    total = min(num_batches, len(dataset) // global_batch)
    picks = [k * len(dataset) // (total * global_batch) for k in range(total * global_batch)]
    for b in range(total):
        start = b * global_batch + rank * per_worker
        yield collate([dataset[i] for i in picks[start:start + per_worker]])
