"""A small MLP classifier whose last layer the Laplace stage makes Bayesian.

`features(x)` is the penultimate representation phi(x) and `head` the last `nn.Linear`: the seam
`last_layer.fit` needs (any classifier exposing both works with the Laplace stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    """The job spec's `model:` block."""

    in_dim: int = 64
    """Input size (64 for 8x8 digits)."""
    hidden: int = 64
    """Width of every hidden layer (the feature dimension of the last layer)."""
    depth: int = 2
    """Hidden layers."""
    num_classes: int = 5
    """Outputs; must equal the number of `data.in_classes`."""

    def __post_init__(self) -> None:
        for name in ("in_dim", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class MLPClassifier(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths = [cfg.in_dim] + [cfg.hidden] * cfg.depth
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300, batch: int = 64,
                lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, outside the platform (tests and benchmarks); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
