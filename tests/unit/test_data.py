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


def test_eval_batches_are_fixed_sharded_and_spread_over_the_whole_set():
    ds = Numbers(48)
    r0 = [b["x"].flatten().tolist() for b in eval_batches(ds, 4, 0, 2, 3)]
    r1 = [b["x"].flatten().tolist() for b in eval_batches(ds, 4, 1, 2, 3)]
    assert r0 == [[0, 4], [16, 20], [32, 36]]  # 12 samples, every 4th: the end of the set is seen
    assert r1 == [[8, 12], [24, 28], [40, 44]]
    assert r0 == [b["x"].flatten().tolist() for b in eval_batches(ds, 4, 0, 2, 3)]  # the same each time
    single = [b["x"].flatten().tolist() for b in eval_batches(ds, 4, 0, 1, 3)]
    assert single == [a + b for a, b in zip(r0, r1)]  # world size changes the split, not the samples
    whole = [b["x"].flatten().tolist() for b in eval_batches(ds, 8, 0, 1, 100)]  # asks for more than there is
    assert sum(whole, []) == list(range(48))
