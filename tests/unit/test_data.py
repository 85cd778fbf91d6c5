"""Sharded batches: disjoint across workers, independent of the worker count, resumable by position."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from shipyard.train.data import ShardedBatches, eval_batches


class Numbers(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor([i])}


def take(it, k):
    return [next(it)["x"].flatten().tolist() for _ in range(k)]


def test_workers_see_disjoint_samples_that_together_make_the_single_worker_batches():
    ds, gb = Numbers(50), 8
    single = take(iter(ShardedBatches(ds, gb, 0, 1, seed=3)), 6)
    parts = [take(iter(ShardedBatches(ds, gb, r, 2, seed=3)), 6) for r in range(2)]
    epoch = []
    for step in range(6):
        a, b = parts[0][step], parts[1][step]
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(single[step])
        epoch += a + b
    assert len(epoch) == len(set(epoch)) == 48  # one epoch (6 batches of 8 of 50): no repeats


def test_epochs_reshuffle_and_resume_continues_exactly():
    ds = Numbers(20)
    full = take(iter(ShardedBatches(ds, 4, 1, 2, seed=0)), 12)
    resumed = take(iter(ShardedBatches(ds, 4, 1, 2, seed=0, start=7)), 5)
    assert resumed == full[7:]
    assert full[:5] != full[5:10]  # epoch 2 has another order


def test_too_small_dataset_is_a_clear_error():
    import pytest
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(Numbers(3), 4, 0, 1, seed=0)


def test_eval_batches_are_fixed_and_sharded():
    ds = Numbers(40)
    r0 = [b["x"].flatten().tolist() for b in eval_batches(ds, 8, 0, 2, 3)]
    r1 = [b["x"].flatten().tolist() for b in eval_batches(ds, 8, 1, 2, 3)]
    assert r0 == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert r1[0] == [4, 5, 6, 7]
