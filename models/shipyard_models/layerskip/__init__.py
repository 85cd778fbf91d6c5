"""LayerSkip ("LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding",
Elhoushi et al., 2024, arXiv:2404.16710) as a Shipyard family: a Llama-style byte-level LM
trained on the Python standard library's source with layer dropout and the early-exit loss,
decoded self-speculatively (draft with the first E layers, verify with the rest).

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`model.py` (the decoder and its KV cache), `recipe.py` (layer dropout, early-exit loss and their
curricula), `speculative.py` (decoding) and `hf.py` (Hugging Face Llama import / export) each
list what they implement and every deviation from the paper.

Deviations of the family seam, and why:
* `loss(model, batch, step, total)` receives no config, and may only call `model(...)` (the model
  may be wrapped), so the model's forward computes the objective itself when given targets:
  `model(inputs, targets_BT=targets, step=step, total_steps=total)` -> (loss, metrics).
* The data are minrnn's: the same `DataConfig` and byte windows of the standard library.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..family import Family
from ..minrnn import DataConfig, decode, encode
from ..minrnn import datasets as minrnn_datasets  # the same byte corpus and tokens
from . import plots, recipe, report
from .hf import check_architecture, export_hf, load_hf
from .model import Block, Config, KVCache, LayerSkipLM
from .speculative import GenerationStats, generate, self_speculative_generate

__all__ = ["FAMILY", "Config", "DataConfig", "LayerSkipLM", "Block", "KVCache", "build",
           "generate", "self_speculative_generate", "GenerationStats", "load_hf", "export_hf",
           "encode", "decode"]

def build(cfg: Config) -> nn.Module:
    """A LayerSkipLM, randomly initialised (torch's RNG) or loaded from `cfg.init_from`.

    With init_from, the directory's architecture must equal cfg's: a mismatch is refused with
    a ValueError naming each differing field (the spec stays the single source of truth, so
    checkpoints and exports describe the model correctly).
    """
    model = LayerSkipLM(cfg)
    if cfg.init_from:
        loaded, state = load_hf(cfg.init_from)
        check_architecture(cfg, loaded, f"init_from {cfg.init_from!r}")
        dtype = model.embed_tokens.weight.dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    if cfg.vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 for the byte corpus, got {cfg.vocab_size}")
    return minrnn_datasets(cfg, data_cfg, cache_dir)  # the same byte windows of the stdlib


def shard_units(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


FAMILY = Family(
    name="layerskip",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=recipe.loss,
    evaluate=recipe.evaluate,
    shard_units=shard_units,
    curriculum_state=recipe.curriculum_state,
    exports={"hf": export_hf},
    plots=plots.exit_plots,
    report=report.report,
)
