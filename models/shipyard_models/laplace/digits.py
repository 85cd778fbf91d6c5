"""scikit-learn's bundled digits (1797 images of 8x8 pixels, 0..16) split for OOD detection.

In-distribution: the classes `in_classes`, relabelled 0..K-1 in that order and split by a seeded
permutation into train / val / test (60 / 20 / 20 per class). Out-of-distribution sets:
* `near`: every image of the other classes (the same pen, the same scanner: the hard case);
* `noise`: uniform pixel noise with each image's intensity total matched to a test image;
* `rotated`: the in-distribution test images turned by 90 degrees.
Pixels are scaled to [0, 1]. Nothing is downloaded: the data ship inside scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

OOD_SETS = ("near", "noise", "rotated")


@dataclass
class Splits:
    """Inputs [n, 64] float32 and labels [n] int64 of each in-distribution split; OOD inputs by name."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    ood: dict[str, torch.Tensor] = field(default_factory=dict)


class Tensors(Dataset):
    """A map-style dataset of {"x": [64] float32, "y": [] int64} items."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def load(in_classes: list[int], seed: int = 0, val_fraction: float = 0.2,
         test_fraction: float = 0.2) -> Splits:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in in_classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(val_fraction * len(idx)), round(test_fraction * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    relabel = np.full(10, -1)
    relabel[list(in_classes)] = np.arange(len(in_classes))
    x, y = {}, {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        x[name] = torch.from_numpy(images[idx].reshape(len(idx), 64))
        y[name] = torch.from_numpy(relabel[labels[idx]])
    test_images = images[np.sort(np.concatenate(parts["test"]))]
    out = np.flatnonzero(~np.isin(labels, in_classes))
    noise = rng.uniform(size=test_images.shape).astype(np.float32)
    noise *= test_images.sum((1, 2), keepdims=True) / noise.sum((1, 2), keepdims=True)
    ood = {"near": torch.from_numpy(images[out].reshape(len(out), 64)),
           "noise": torch.from_numpy(np.clip(noise, 0, 1).reshape(len(noise), 64)),
           "rotated": torch.from_numpy(np.rot90(test_images, 1, axes=(1, 2)).copy().reshape(-1, 64))}
    return Splits(x, y, ood)


def check_classes(in_classes: list[int]) -> None:
    if len(in_classes) < 2 or len(set(in_classes)) != len(in_classes) or not all(
            isinstance(c, int) and 0 <= c <= 9 for c in in_classes):
        raise ValueError(f"in_classes must be at least two distinct digits 0..9, got {in_classes}")
    if len(in_classes) == 10:
        raise ValueError("in_classes: leave at least one digit out (it is the near-OOD set)")
