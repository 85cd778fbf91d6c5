"""Matformer vs a SchNet baseline on generated EMT crystals: accuracy, speed, graph building.

Claims (Yan et al. 2022, "Periodic Graph Transformers for Crystal Material Property
Prediction"): Matformer is more accurate than CGCNN / SchNet at a similar budget and fast (~3x
ALIGNN). Issue 9 adds a sanity claim: a small Matformer on ~1000 generated structures reaches a
validation MAE below 0.3 of the target's standard deviation.

Protocol: one dataset (`data.crystals.generate`, EMT formation energy per atom, seeded random
90/10 split), one graph per crystal (`matformer.crystal_graph`: canonical cell, 12-NN multigraph
with pattern self-loops), fed to both models. Baseline: torch-geometric's `SchNet` with those
same edges passed in through its `interaction_graph` hook (torch-cluster, which it would use to
build a radius graph, is not installable here), mean readout. Both train with the same steps,
batch, AdamW, warm-up + cosine learning rate and MSE on standardised targets (the family's own
loss for Matformer). Speed is timed separately, round-robin (one step of each model per round on
the same batch, median over rounds), so load from other processes hits both alike.

Figures (benchmarks/results/matformer.json):
  mae_ratio_vs_baseline         Matformer val MAE / SchNet val MAE (< 1: Matformer better)
  mae_over_target_std           Matformer val MAE / std of the validation targets
  baseline_mae_over_target_std  the same for SchNet; mean_predictor_mae_over_target_std for scale
  graph_build_ms_per_structure  canonicalisation + periodic graph, per crystal
  train_structures_per_s_*, infer_structures_per_s_* and their ratio (Matformer / SchNet)

Usage: python benchmarks/matformer.py [--quick]  ->  benchmarks/results/matformer.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import shipyard_models  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "models"))
from shipyard_models.data.crystals import generate  # noqa: E402
from shipyard_models.matformer import (FAMILY, Config, build_datasets, crystal_graph,  # noqa: E402
                                       flat_batch, unpad)
from torch_geometric.nn.models import SchNet  # noqa: E402


class GivenEdges(nn.Module):
    """SchNet's `interaction_graph` hook answering with edges computed elsewhere."""

    def __init__(self):
        super().__init__()
        self.edges: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, pos, batch):
        return self.edges


class SchNetBaseline(nn.Module):
    """torch-geometric SchNet on a flat Matformer batch (same edges, mean readout)."""

    def __init__(self, hidden: int, interactions: int):
        super().__init__()
        self.graph = GivenEdges()
        self.net = SchNet(hidden_channels=hidden, num_filters=hidden, num_interactions=interactions,
                          num_gaussians=50, cutoff=8.0, interaction_graph=self.graph, readout="mean")

    def forward(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        # torch-geometric's edge_index is (source, target): messages flow src -> dst
        self.graph.edges = (torch.stack([g["edge_src"], g["edge_dst"]]), g["edge_dist"].float())
        pos = torch.zeros(len(g["species"]), 3)  # unused: the hook supplies the distances
        return self.net(g["species"], pos, g["node_graph"]).squeeze(-1)


def batches(dataset, batch: int, steps: int, seed: int):
    from torch.utils.data import default_collate
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch,), generator=gen).tolist()
        yield default_collate([dataset[i] for i in idx])


def train(model: nn.Module, loss_fn, train_set, steps: int, batch: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    warm = max(1, steps // 20)
    model.train()
    for step, b in enumerate(batches(train_set, batch, steps, seed=0)):
        scale = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = loss_fn(model, b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()


def round_robin(models: dict, loss_fns: dict, train_set, val_batch, batch: int, rounds: int) -> dict:
    """Median structures/s of a training step (forward + backward) and of inference, per model."""
    times = {(name, kind): [] for name in models for kind in ("train", "infer")}
    for r, b in enumerate(batches(train_set, batch, rounds + 2, seed=1)):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            loss_fns[name](model, b).backward()
            if r >= 2:  # two warm-up rounds
                times[name, "train"].append(time.perf_counter() - start)
            model.zero_grad()
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(val_batch)
                if r >= 2:
                    times[name, "infer"].append(time.perf_counter() - start)
    n_val = int(val_batch["num_graphs"])
    return {key: (batch if key[1] == "train" else n_val) / float(np.median(t)) for key, t in times.items()}


def standardised_mse(model, b):
    target = (b["y"] - b["y_mean"]) / b["y_std"]
    return torch.nn.functional.mse_loss(model(unpad(b)), target)


@torch.no_grad()
def val_mae(model, val_b) -> float:
    """MAE in target units over the whole validation split."""
    model.eval()
    pred = model(unpad(val_b))
    return ((pred * val_b["y_std"] + val_b["y_mean"]) - val_b["y"]).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer structures and steps (~5 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "matformer.json")
    parser.add_argument("--structures", type=int, help="override the number of structures")
    parser.add_argument("--steps", type=int, help="override the training steps")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    n, steps, batch, lr = (400, 300, 32, 2e-3) if args.quick else (1000, 1200, 32, 2e-3)
    n, steps = args.structures or n, args.steps or steps
    cfg = Config(hidden=64, layers=3, heads=2, fc_hidden=64)

    structures = generate(n, seed=0)
    targets = np.array([a.info["formation_energy_per_atom"] for a in structures])
    start = time.perf_counter()
    graphs = [crystal_graph(a, cfg) for a in structures]
    graph_ms = 1e3 * (time.perf_counter() - start) / n
    train_set, val_set = build_datasets(graphs, targets, 0.1, seed=0)
    val_std = float(val_set.targets.std())

    torch.manual_seed(0)
    matformer = FAMILY.build(cfg)
    matformer.target_mean.fill_(train_set.y_mean)
    matformer.target_std.fill_(train_set.y_std)
    torch.manual_seed(0)
    schnet = SchNetBaseline(hidden=64, interactions=3)
    losses = {"m": lambda m, b: FAMILY.loss(m, b, 0, steps)[0], "s": standardised_mse}
    models = {"m": matformer, "s": schnet}
    start = time.perf_counter()
    for key in models:
        train(models[key], losses[key], train_set, steps, batch, lr)
    train_minutes = (time.perf_counter() - start) / 60
    from torch.utils.data import default_collate
    val_b = default_collate([val_set[i] for i in range(len(val_set))])
    mae_m, mae_s = val_mae(matformer, val_b), val_mae(schnet, val_b)
    timed = round_robin(models, losses, train_set, unpad(val_b), batch, rounds=5 if args.quick else 15)
    speed = {f"{kind}_{key}": timed[key, kind] for key in models for kind in ("train", "infer")}
    mean_mae = float(np.abs(val_set.targets - train_set.y_mean).mean())

    figures = {
        "quick": args.quick, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "structures": n, "steps": steps, "batch": batch,
        "params_matformer": sum(p.numel() for p in matformer.parameters()),
        "params_schnet": sum(p.numel() for p in schnet.parameters()),
        "mae_matformer_ev_per_atom": round(mae_m, 5), "mae_schnet_ev_per_atom": round(mae_s, 5),
        "mae_ratio_vs_baseline": round(mae_m / mae_s, 3),
        "mae_over_target_std": round(mae_m / val_std, 3),
        "baseline_mae_over_target_std": round(mae_s / val_std, 3),
        "mean_predictor_mae_over_target_std": round(mean_mae / val_std, 3),
        "graph_build_ms_per_structure": round(graph_ms, 2),
        "train_structures_per_s_matformer": round(speed["train_m"], 1),
        "train_structures_per_s_schnet": round(speed["train_s"], 1),
        "train_speed_ratio_vs_baseline": round(speed["train_m"] / speed["train_s"], 3),
        "infer_structures_per_s_matformer": round(speed["infer_m"], 1),
        "infer_structures_per_s_schnet": round(speed["infer_s"], 1),
        "infer_speed_ratio_vs_baseline": round(speed["infer_m"] / speed["infer_s"], 3),
    }
    print(f"{n} structures, {steps} steps x {batch}; val target std {val_std:.4f} eV/atom")
    print(f"{'model':<10} {'val MAE':>9} {'MAE/std':>8} {'train str/s':>12} {'infer str/s':>12}")
    print(f"{'Matformer':<10} {mae_m:9.4f} {mae_m / val_std:8.3f} {speed['train_m']:12.1f} {speed['infer_m']:12.1f}")
    print(f"{'SchNet':<10} {mae_s:9.4f} {mae_s / val_std:8.3f} {speed['train_s']:12.1f} {speed['infer_s']:12.1f}")
    print(f"{'mean':<10} {mean_mae:9.4f} {mean_mae / val_std:8.3f}")
    print(f"graph construction: {graph_ms:.2f} ms per structure; training both: {train_minutes:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
