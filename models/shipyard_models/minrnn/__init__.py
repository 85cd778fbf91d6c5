"""minGRU / minLSTM ("Were RNNs All We Needed?", Feng et al., 2024, arXiv:2410.01201) as a
Shipyard family: a byte-level language model trained on the Python standard library's source.

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`model.py` lists what is implemented and every deviation from the paper; `scan.py` the scans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.stdlib_code import ByteWindows, load_splits
from ..family import Batch, Family, Metrics
from .model import Block, Config, MinRNN, MinRNNLM, sample

__all__ = ["FAMILY", "Config", "DataConfig", "MinRNNLM", "MinRNN", "Block", "sample", "encode",
           "decode"]


@dataclass
class DataConfig:
    """The job spec's `data:` block: byte windows of the standard library's source."""

    seq_len: int = 256
    """Tokens per training window (each item holds seq_len + 1 bytes: inputs and targets)."""
    max_bytes: int = 0
    """Cap on the corpus size in bytes (train + val); 0 = the whole standard library."""
    val_every: int = 10
    """About one file in `val_every` goes to validation (by a hash of its path)."""
    include_tests: bool = False
    """Also use the standard library's own test suites."""
    root: str = ""
    """Corpus root directory; "" = this interpreter's standard library."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        if self.val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {self.val_every}")


def encode(text: str) -> torch.Tensor:
    """Tokens of a text: its UTF-8 bytes, int64 [T]."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(tokens: torch.Tensor) -> str:
    """Text of byte tokens; invalid UTF-8 (a sampled byte sequence may be) becomes U+FFFD."""
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def build(cfg: Config) -> nn.Module:
    return MinRNNLM(cfg)


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    train, val = load_splits(Path(cache_dir), data_cfg.max_bytes, data_cfg.val_every,
                             data_cfg.include_tests, data_cfg.root)
    return ByteWindows(train, data_cfg.seq_len), ByteWindows(val, data_cfg.seq_len)


def _metrics(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    tokens = batch["tokens"]
    logits, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    detached = loss.detach()
    return loss, {"loss": detached, "bits_per_byte": detached / math.log(2)}


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    """Next-byte cross-entropy (nats); no step-dependent curriculum."""
    return _metrics(model, batch)


def evaluate(model: nn.Module, batch: Batch) -> Metrics:
    return _metrics(model, batch)[1]


def shard_units(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


FAMILY = Family(
    name="minrnn",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=evaluate,
    shard_units=shard_units,
    curriculum_state=None,
)
