"""The digits classifier family: splits without overlap, relabelled classes, the OOD sets, the
seam functions, and the report `shipyard report` prints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shipyard_models.laplace import FAMILY, Config, DataConfig, splits, train_plain



def test_splits_and_ood_sets():
    from sklearn.datasets import load_digits
    data = DataConfig(in_classes=[3, 7, 1])
    s = splits(Config(num_classes=3), data)
    raw = load_digits()
    rows = {tuple((raw.images[i] / 16.0).astype(np.float32).reshape(-1)): int(raw.target[i])
            for i in range(len(raw.target))}
    seen = set()
    for name in ("train", "val", "test"):
        x, y = s.x[name], s.y[name]
        assert x.shape[1] == 64 and x.dtype == torch.float32 and y.dtype == torch.int64
        for xi, yi in zip(x.numpy(), y.tolist()):
            key = tuple(xi)
            assert [3, 7, 1][yi] == rows[key]  # relabelled in the order of in_classes
            assert key not in seen  # no image in two splits
            seen.add(key)
    assert abs(len(s.y["val"]) - 0.2 * len(seen)) <= 3
    assert {rows[tuple(xi)] for xi in s.ood["near"].numpy()} == {0, 2, 4, 5, 6, 8, 9}
    turned = torch.from_numpy(np.rot90(s.x["test"].reshape(-1, 8, 8).numpy(), 1, axes=(1, 2)).copy())
    assert torch.equal(s.ood["rotated"], turned.reshape(-1, 64))
    assert 0 <= float(s.ood["noise"].min()) and float(s.ood["noise"].max()) <= 1
    # The same seed gives the same split; another seed another one.
    assert torch.equal(splits(Config(num_classes=3), data).x["train"], s.x["train"])
    other = splits(Config(num_classes=3), DataConfig(in_classes=[3, 7, 1], split_seed=1))
    assert not torch.equal(other.x["train"], s.x["train"])


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="in_classes"):
        DataConfig(in_classes=[1, 1])
    with pytest.raises(ValueError, match="in_classes"):
        DataConfig(in_classes=list(range(10)))
    with pytest.raises(ValueError, match="model.num_classes"):
        splits(Config(num_classes=4), DataConfig())
    with pytest.raises(ValueError, match="hidden"):
        Config(hidden=0)


def test_family_seam_and_report():
    torch.manual_seed(0)
    cfg, data = Config(hidden=32), DataConfig()
    train, val = FAMILY.datasets(cfg, data, Path("."))
    batch = {k: torch.stack([train[i][k] for i in range(16)]) for k in ("x", "y")}
    model = FAMILY.build(cfg)
    loss, metrics = FAMILY.loss(model, batch, 0, 1)
    assert loss.requires_grad and set(metrics) == {"loss", "accuracy"}
    assert FAMILY.shard_units(model) == list(model.blocks)
    s = splits(cfg, data)
    train_plain(model, s.x["train"], s.y["train"], steps=100)
    with torch.no_grad():
        assert FAMILY.evaluate(model, {"x": s.x["val"], "y": s.y["val"]})["accuracy"] > 0.9
    text = FAMILY.report(model, cfg, data, Path("."))
    assert "icla" in text and "AUROC near" in text
