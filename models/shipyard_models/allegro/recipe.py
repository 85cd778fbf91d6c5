"""Training objective and metrics: energy + force (+ stress) loss on padded batches.

loss = w_E * mean((E_pred - E) / n_atoms)^2 + w_F * mean over real atoms and components of
(F_pred - F)^2 + w_S * mean over structures with stress of (sigma_pred - sigma)^2, in eV and A.
Forces (and the stress) come from autograd of the energy with `create_graph` while training, so
the loss differentiates through them. The per-species shift and scale of the training set travel
in every batch and are installed in the model's buffers before each forward: then every worker
holds them, and checkpoints carry them, without the platform knowing about them.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import Allegro, energy_forces_virial
from .neighbors import batch_graph

Batch = dict[str, torch.Tensor]


def unwrap(model: nn.Module) -> Allegro:
    """The `Allegro` inside a DDP wrapper (FSDP2 and DeepSpeed-free runs pass it as is)."""
    return model.module if hasattr(model, "module") and not isinstance(model, Allegro) else model


def predict_batch(model: nn.Module, batch: Batch, training: bool) -> tuple[dict, dict]:
    core = unwrap(model)
    dtype = next(core.parameters()).dtype
    with torch.no_grad():
        core.species_shift.copy_(batch["shift"][0])
        core.species_scale.copy_(batch["scale"][0])
    g = batch_graph(batch, core.cfg.r_max, dtype)
    out = energy_forces_virial(model, g["numbers"], g["positions"], g["edge_index"], g["edge_shift"],
                               g["owned"], graph_of_N=g["graph"], n_graphs=g["n_graphs"], training=training)
    return out, g


def errors(model: nn.Module, batch: Batch, training: bool) -> dict[str, torch.Tensor]:
    out, g = predict_batch(model, batch, training)
    dtype = out["energy"].dtype
    mask = batch["mask"].bool()
    n_atoms = mask.sum(dim=1).to(dtype)
    volume = torch.linalg.det(batch["cell"].to(dtype)).abs()
    stress_pred = -out["virial"] / volume[:, None, None]
    has_stress = batch["has_stress"].to(dtype)
    return {
        "energy_per_atom": (out["energy"] - batch["energy"].to(dtype)) / n_atoms,
        "forces": out["forces"] - batch["forces"].to(dtype)[mask],
        "stress": (stress_pred - batch["stress"].to(dtype)) * has_stress[:, None, None],
        "n_stress": has_stress.sum(),
    }


def loss(model: nn.Module, batch: Batch, weights: tuple[float, float, float]) -> tuple[torch.Tensor, dict]:
    err = errors(model, batch, training=True)
    w_e, w_f, w_s = weights
    e_term = err["energy_per_atom"].pow(2).mean()
    f_term = err["forces"].pow(2).mean()
    s_term = err["stress"].pow(2).sum() / (9 * err["n_stress"].clamp(min=1))
    total = w_e * e_term + w_f * f_term + (w_s * s_term if w_s else 0.0)
    return total, {"loss": total.detach(), **metrics_of(err)}


def metrics_of(err: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """energy MAE per atom (eV), force MAE and RMSE (eV/A), stress MAE (eV/A^3, if labelled)."""
    m = {
        "energy_mae_per_atom": err["energy_per_atom"].detach().abs().mean(),
        "force_mae": err["forces"].detach().abs().mean(),
        "force_rmse": err["forces"].detach().pow(2).mean().sqrt(),
    }
    if err["n_stress"] > 0:
        m["stress_mae"] = err["stress"].detach().abs().sum() / (9 * err["n_stress"])
    return m


def evaluate(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Validation metrics; forces need autograd, so gradients are switched back on locally."""
    with torch.enable_grad():
        err = errors(model, batch, training=False)
    return metrics_of(err)
