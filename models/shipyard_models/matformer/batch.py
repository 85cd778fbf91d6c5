"""Crystal graphs as fixed-shape samples, and back to one flat graph per batch.

The platform stacks dataset items (dicts of equally shaped tensors), so each crystal's graph is
padded to the dataset's largest atom count and edge count:
    species   int64 [N_max]   atomic numbers, 0 = padding
    edge_src  int64 [E_max]   sending atom (index within the crystal), 0 on padding
    edge_dst  int64 [E_max]   receiving atom
    edge_dist float [E_max]   edge length (A)
    edge_mask bool  [E_max]   True for real edges
    y, y_mean, y_std float [] the target and the training split's mean / std (for standardising)
`unpad` turns a stacked batch into the flat graph `Matformer.forward` takes (padding removed,
atom indices offset per crystal), so padding never reaches the model and costs only memory.
"""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from torch.utils.data import Dataset

from .canonical import canonicalize
from .graph import periodic_graph
from .model import Config


def crystal_graph(atoms: Atoms, cfg: Config) -> dict[str, np.ndarray]:
    """species [N], edge_src / edge_dst [E], edge_dist [E] of one crystal, built as `cfg` says."""
    if len(atoms) == 0:
        raise ValueError("a crystal needs at least one atom")
    if not all(atoms.pbc):
        raise ValueError("crystals must be periodic along all three cell vectors (atoms.pbc)")
    if int(atoms.numbers.max()) > cfg.max_z or int(atoms.numbers.min()) < 1:
        raise ValueError(f"atomic numbers must be in 1..{cfg.max_z} (model.max_z), "
                         f"got {sorted(set(atoms.numbers.tolist()))}")
    if cfg.canonical_cell:
        atoms = canonicalize(atoms)
    g = periodic_graph(atoms.positions, atoms.cell[:], cfg.k_neighbors, cfg.rel_eps, cfg.pattern_edges)
    return {"species": atoms.numbers.astype(np.int64), "edge_src": g.src, "edge_dst": g.dst,
            "edge_dist": g.distance}


def flat_batch(graphs: list[dict[str, np.ndarray]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Several crystal graphs as one flat graph (what `Matformer.forward` takes)."""
    offsets = np.cumsum([0] + [len(g["species"]) for g in graphs])
    return {
        "species": torch.from_numpy(np.concatenate([g["species"] for g in graphs])),
        "node_graph": torch.from_numpy(np.repeat(np.arange(len(graphs)), np.diff(offsets))),
        "edge_src": torch.from_numpy(np.concatenate([g["edge_src"] + o for g, o in zip(graphs, offsets)])),
        "edge_dst": torch.from_numpy(np.concatenate([g["edge_dst"] + o for g, o in zip(graphs, offsets)])),
        "edge_dist": torch.from_numpy(np.concatenate([g["edge_dist"] for g in graphs])).to(dtype),
        "num_graphs": torch.tensor(len(graphs)),
    }


def unpad(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stacked batch of padded crystals -> one flat graph."""
    species_BN, mask_BE = batch["species"], batch["edge_mask"]
    B, n_max = species_BN.shape
    atom_mask = (species_BN > 0).reshape(-1)
    new_index = torch.cumsum(atom_mask.long(), 0) - 1
    base_B1 = torch.arange(B, device=species_BN.device)[:, None] * n_max
    flat_edges = mask_BE.reshape(-1)
    src = (batch["edge_src"] + base_B1).reshape(-1)[flat_edges]
    dst = (batch["edge_dst"] + base_B1).reshape(-1)[flat_edges]
    graph_of_atom = torch.arange(B, device=species_BN.device).repeat_interleave(n_max)
    return {"species": species_BN.reshape(-1)[atom_mask], "node_graph": graph_of_atom[atom_mask],
            "edge_src": new_index[src], "edge_dst": new_index[dst],
            "edge_dist": batch["edge_dist"].reshape(-1)[flat_edges], "num_graphs": torch.tensor(B)}


class CrystalGraphs(Dataset):
    """Padded graphs of crystals with their targets (see the module docstring)."""

    def __init__(self, graphs: list[dict[str, np.ndarray]], targets: np.ndarray,
                 y_mean: float, y_std: float):
        if len(graphs) != len(targets):
            raise ValueError(f"{len(graphs)} graphs but {len(targets)} targets")
        self.graphs, self.targets = graphs, np.asarray(targets, dtype=np.float64)
        self.y_mean, self.y_std = float(y_mean), float(y_std)
        self.n_max = max(len(g["species"]) for g in graphs)
        self.e_max = max(len(g["edge_src"]) for g in graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g, n, e = self.graphs[i], len(self.graphs[i]["species"]), len(self.graphs[i]["edge_src"])
        species = torch.zeros(self.n_max, dtype=torch.int64)
        species[:n] = torch.from_numpy(g["species"])
        src = torch.zeros(self.e_max, dtype=torch.int64)
        dst = torch.zeros(self.e_max, dtype=torch.int64)
        dist = torch.zeros(self.e_max, dtype=torch.float32)
        src[:e], dst[:e] = torch.from_numpy(g["edge_src"]), torch.from_numpy(g["edge_dst"])
        dist[:e] = torch.from_numpy(g["edge_dist"])
        mask = torch.zeros(self.e_max, dtype=torch.bool)
        mask[:e] = True
        return {"species": species, "edge_src": src, "edge_dst": dst, "edge_dist": dist,
                "edge_mask": mask, "y": torch.tensor(self.targets[i], dtype=torch.float32),
                "y_mean": torch.tensor(self.y_mean, dtype=torch.float32),
                "y_std": torch.tensor(self.y_std, dtype=torch.float32)}
