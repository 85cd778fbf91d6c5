"""TokenFormer ("TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters",
Wang et al., 2024, arXiv:2410.23168) as a Shipyard family: a byte-level language model of the
Python standard library's source whose projections are Pattention layers, grown progressively
between the stages of a multi-stage job.

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`model.py` (the model) and `growth.py` (growth of weights and optimizer state) list what they
implement and every deviation from the paper. The data are minrnn's: the same `DataConfig` and
byte windows of the standard library.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..family import Batch, Family, Metrics, Transform
from ..minrnn import DataConfig, decode, encode
from ..minrnn import datasets as minrnn_datasets  # the same byte corpus and tokens
from .growth import GrowArgs, grow, grow_config, grow_optimizer_state, grow_state
from .model import Block, Config, Pattention, TokenFormerLM, count_parameters, flops_per_token

__all__ = ["FAMILY", "Config", "DataConfig", "TokenFormerLM", "Pattention", "Block", "GrowArgs",
           "grow", "grow_config", "grow_state", "grow_optimizer_state", "count_parameters",
           "flops_per_token", "encode", "decode"]


def build(cfg: Config) -> nn.Module:
    return TokenFormerLM(cfg)


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    if cfg.vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 for the byte corpus, got {cfg.vocab_size}")
    if data_cfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len ({data_cfg.seq_len}) exceeds model.max_seq_len ({cfg.max_seq_len})")
    return minrnn_datasets(cfg, data_cfg, cache_dir)


def _metrics(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
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


def _grow_states(model_state: dict, optim_state: dict | None, args: GrowArgs):
    """The `grow` stage transform on full state dicts (see growth.py)."""
    return grow_state(model_state, args), (None if optim_state is None
                                           else grow_optimizer_state(optim_state, args))


GROW = Transform(Args=GrowArgs, config=grow_config, state=_grow_states)


FAMILY = Family(
    name="tokenformer",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=evaluate,
    shard_units=shard_units,
    transforms={"grow": GROW},
)
