"""Matformer ("Periodic Graph Transformers for Crystal Material Property Prediction", Yan et al.,
NeurIPS 2022) as a Shipyard family: one scalar property per crystal, by default the EMT formation
energy per atom of generated metal crystals (`shipyard_models.data.crystals`).

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`graph.py` builds the periodic multigraph, `canonical.py` the canonical cell, `model.py` the
network (with every deviation from the paper), `batch.py` the padded samples.

Batches: the platform stacks equally shaped tensors, so every crystal is padded to its split's
largest atom and edge counts (masks mark the real ones) and `unpad` rebuilds one flat graph per
batch before the model sees it. Targets are standardised with the training split's mean and std,
which ride along in each sample and are copied into the model's `target_mean` / `target_std`
buffers, so a checkpoint predicts in target units on its own (`predict`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ase import Atoms
from torch import nn

from ..data import crystals
from ..family import Batch, Family, Metrics
from .batch import CrystalGraphs, crystal_graph, flat_batch, unpad
from .canonical import canonicalize
from .graph import PeriodicGraph, periodic_graph
from .model import Config, Matformer, MatformerConv

__all__ = ["FAMILY", "Config", "DataConfig", "Matformer", "MatformerConv", "PeriodicGraph",
           "periodic_graph", "canonicalize", "crystal_graph", "flat_batch", "unpad", "predict",
           "CrystalGraphs", "build_datasets"]

CACHE_VERSION = 1


@dataclass
class DataConfig:
    """The job spec's `data:` block."""

    source: str = "generated"
    """"generated" (EMT-labelled metal crystals) or a path: a folder of CIF/POSCAR/extxyz files
    (targets from `targets.csv` or each frame's info) or one multi-frame extxyz file."""
    target_key: str = "formation_energy_per_atom"
    """The target: for generated data one of `formation_energy_per_atom`, `energy_per_atom`;
    for files the info key (extxyz `key=value`), or `energy` / `energy_per_atom` from the file's
    energy."""
    num_structures: int = 1000
    """Generated data: how many crystals (train + validation)."""
    max_atoms: int = 16
    """Generated data: largest alloy supercell."""
    elements: list[str] = field(default_factory=lambda: list(crystals.EMT_METALS))
    """Generated data: fcc metals EMT knows."""
    strain: float = 0.03
    """Generated data: std of the random symmetric strain."""
    rattle: float = 0.05
    """Generated data: std of the atomic displacements (A)."""
    val_fraction: float = 0.1
    """Share of the structures held out for validation (a seeded random split)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source == "generated" and self.target_key not in crystals.TARGETS:
            raise ValueError(f"target_key must be one of {', '.join(crystals.TARGETS)} for generated "
                             f"data, got {self.target_key!r}")
        if self.num_structures < 2:
            raise ValueError(f"num_structures must be >= 2, got {self.num_structures}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_atoms < 4:
            raise ValueError(f"max_atoms must be >= 4, got {self.max_atoms}")
        if self.strain < 0 or self.rattle < 0:
            raise ValueError(f"strain and rattle must be >= 0, got {self.strain}, {self.rattle}")
        for symbol in self.elements:
            crystals.fcc_constant(symbol)


def build(cfg: Config) -> nn.Module:
    return Matformer(cfg)


def _graphs_and_targets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    """Graphs of every structure with their targets, cached as plain arrays (npz, no pickle)."""
    graph_keys = ("k_neighbors", "rel_eps", "pattern_edges", "canonical_cell")
    key = json.dumps({"v": CACHE_VERSION, "data": asdict(data_cfg),
                      "graph": {k: getattr(cfg, k) for k in graph_keys}}, sort_keys=True)
    generated = data_cfg.source == "generated"
    path = Path(cache_dir) / f"matformer-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if generated and path.exists():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # each z[k] reads the file again: once only
        n_off = np.cumsum(np.r_[0, arrays["n_atoms"]])
        e_off = np.cumsum(np.r_[0, arrays["n_edges"]])
        graphs = [{"species": arrays["species"][n_off[i]:n_off[i + 1]],
                   **{k: arrays[k][e_off[i]:e_off[i + 1]] for k in ("edge_src", "edge_dst", "edge_dist")}}
                  for i in range(len(arrays["y"]))]
        return graphs, arrays["y"]
    if generated:
        structures = crystals.generate(data_cfg.num_structures, data_cfg.seed, data_cfg.elements,
                                       data_cfg.max_atoms, strain=data_cfg.strain, rattle=data_cfg.rattle)
        targets = np.array([a.info[data_cfg.target_key] for a in structures])
    else:
        structures, targets = crystals.read(data_cfg.source, data_cfg.target_key)
    graphs = [crystal_graph(a, cfg) for a in structures]
    if generated:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.concatenate([g[k] for g in graphs]) for k in graphs[0]}
        arrays.update(n_atoms=np.array([len(g["species"]) for g in graphs]),
                      n_edges=np.array([len(g["edge_src"]) for g in graphs]), y=targets)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
    return graphs, targets


def build_datasets(graphs, targets, val_fraction: float, seed: int):
    """Seeded random split; both splits standardised with the training split's statistics."""
    if len(graphs) < 2:
        raise ValueError(f"need at least 2 structures for a train/validation split, got {len(graphs)}")
    order = np.random.default_rng(seed + 1).permutation(len(graphs))
    n_val = min(len(graphs) - 1, max(1, round(val_fraction * len(graphs))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    y_train = targets[train_idx]
    mean, std = float(y_train.mean()), float(y_train.std())
    std = std if std > 0 else 1.0
    make = lambda idx: CrystalGraphs([graphs[i] for i in idx], targets[idx], mean, std)  # noqa: E731
    return make(train_idx), make(val_idx)


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    graphs, targets = _graphs_and_targets(cfg, data_cfg, cache_dir)
    return build_datasets(graphs, targets, data_cfg.val_fraction, data_cfg.seed)


def _metrics(model: nn.Module, batch: Batch, loss_kind: str) -> tuple[torch.Tensor, Metrics]:
    core = getattr(model, "module", model)  # DDP / DeepSpeed wrap the Matformer
    with torch.no_grad():  # the split's statistics travel with the data; keep them in the weights
        core.target_mean.fill_(batch["y_mean"][0].item())
        core.target_std.fill_(batch["y_std"][0].item())
    pred = model(unpad(batch))
    target = (batch["y"] - batch["y_mean"]) / batch["y_std"]
    err = pred.float() - target
    loss = F.mse_loss(pred.float(), target) if loss_kind == "mse" else err.abs().mean()
    mae_std = err.detach().abs().mean()
    return loss, {"loss": loss.detach(), "mae": mae_std * batch["y_std"][0],
                  "mae_over_std": mae_std}


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    """MSE (or L1) on standardised targets; `mae` is in target units (eV/atom for EMT data)."""
    return _metrics(model, batch, getattr(model, "module", model).cfg.loss)


def evaluate(model: nn.Module, batch: Batch) -> Metrics:
    return _metrics(model, batch, getattr(model, "module", model).cfg.loss)[1]


def shard_units(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


@torch.no_grad()
def predict(model: Matformer, structures: list[Atoms]) -> torch.Tensor:
    """Targets (in target units) of crystals, with the graph rule the model was trained with."""
    model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = flat_batch([crystal_graph(a, model.cfg) for a in structures], dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    return model.denormalise(model(batch))


FAMILY = Family(
    name="matformer",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=evaluate,
    shard_units=shard_units,
    curriculum_state=None,
)
