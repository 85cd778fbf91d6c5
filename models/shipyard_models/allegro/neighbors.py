"""Neighbour lists with periodic images, and the flat graph a batch of structures becomes.

The edge indices are found in float64 NumPy by ASE's linear-scaling binning
(`primitive_neighbor_list`); the edge vectors are then formed in torch from the positions and the
integer image shifts, so forces and the virial flow through them by autograd.
"""
from __future__ import annotations

import numpy as np
import torch
from ase.neighborlist import primitive_neighbor_list


def neighbor_list(positions_N3: np.ndarray, cell_33: np.ndarray, pbc_3: np.ndarray, r_max: float,
                  centers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs i->j (i != j or a different image) with |x_j + S @ cell - x_i| < r_max.

    Returns edge_index [2, E] (int64) and the integer image shifts S [E, 3]. With `centers`, only
    edges from atoms 0..centers-1 are kept (the owned atoms of a domain come first).
    Non-periodic directions need no cell (zeros are fine).
    """
    positions = np.asarray(positions_N3, dtype=np.float64)
    if len(positions) == 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)
    i, j, S = primitive_neighbor_list("ijS", np.asarray(pbc_3, dtype=bool), np.asarray(cell_33, dtype=np.float64),
                                      positions, float(r_max), self_interaction=False)
    if centers is not None:
        keep = i < centers
        i, j, S = i[keep], j[keep], S[keep]
    order = np.lexsort((j, i))  # deterministic edge order: by center, then neighbour
    return np.stack([i[order], j[order]]).astype(np.int64), S[order].astype(np.int64)


def batch_graph(batch: dict[str, torch.Tensor], r_max: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Flatten a padded batch (positions [B, N, 3], numbers [B, N], mask [B, N], cell [B, 3, 3],
    pbc [B, 3]) into one graph of its real atoms, with periodic edges within r_max."""
    mask = batch["mask"].bool()
    B = mask.shape[0]
    counts = mask.sum(dim=1)
    offsets = torch.cumsum(counts, 0) - counts
    edges, shifts, graph = [], [], []
    positions = batch["positions"].to(dtype)
    cells = batch["cell"].to(dtype)
    for b in range(B):
        n = int(counts[b])
        pos = positions[b][mask[b]]
        ei, S = neighbor_list(pos.detach().cpu().numpy(), cells[b].detach().cpu().numpy(),
                              batch["pbc"][b].cpu().numpy(), r_max)
        edges.append(torch.from_numpy(ei) + offsets[b].cpu())
        shifts.append(torch.from_numpy(S).to(dtype) @ cells[b].cpu())
        graph.append(torch.full((n,), b, dtype=torch.long))
    device = positions.device
    return {
        "numbers": batch["numbers"][mask].long(),
        "positions": positions[mask],
        "edge_index": torch.cat(edges, dim=1).to(device),
        "edge_shift": torch.cat(shifts).to(device),
        "graph": torch.cat(graph).to(device),
        "owned": torch.ones(int(counts.sum()), dtype=torch.bool, device=device),
        "n_graphs": B,
    }
