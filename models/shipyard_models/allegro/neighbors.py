"""Neighbour lists with periodic images, and the flat graph a batch of structures becomes.

The edge indices are found in float64 NumPy by a vectorised cell list (`cell_list_pairs`): the
space is cut into cubic bins at least r_max wide, and each center is compared only with the atoms
in its own and the 26 adjacent bins, so the work is O(N) at fixed density. A periodic cell is
first padded with the periodic images within r_max of it (in fractional coordinates, so any cell
shape works), then searched as an open system. Cells periodic along some axes only (slabs, wires),
and points spread over more than 2^62 bins, go to ASE's `primitive_neighbor_list`, which finds
the same pairs, more slowly (10-20x on periodic boxes, and ~700x on a domain's open box of owned
and ghost atoms: 40 s for 4,631 atoms, which is what stalled the partitioned benchmark's actors).
The edge vectors are formed in torch from the positions and the integer image shifts, so forces
and the virial flow through them by autograd.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from ase.neighborlist import primitive_neighbor_list

_OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int64)  # [27, 3]


def neighbor_list(positions_N3: np.ndarray, cell_33: np.ndarray, pbc_3: np.ndarray, r_max: float,
                  centers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs i->j (i != j or a different image) with |x_j + S @ cell - x_i| < r_max.

    Returns edge_index [2, E] (int64) and the integer image shifts S [E, 3], sorted by center,
    then neighbour, then shift. With `centers`, only edges from atoms 0..centers-1 are kept (the
    owned atoms of a domain come first). Non-periodic directions need no cell (zeros are fine).
    """
    positions = np.asarray(positions_N3, dtype=np.float64)
    pbc = np.asarray(pbc_3, dtype=bool)
    n = len(positions)
    n_centers = n if centers is None else min(int(centers), n)
    if n == 0 or n_centers == 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)
    try:
        if pbc.all():
            cell = np.asarray(cell_33, dtype=np.float64)
            atom, image_shift = periodic_images(positions, cell, r_max)
            points = positions[atom] + image_shift @ cell
            i, m = cell_list_pairs(points, n_centers, r_max)
            j, S = atom[m], image_shift[m] - image_shift[i]
        elif not pbc.any():
            i, j = cell_list_pairs(positions, n_centers, r_max)
            S = np.zeros((len(i), 3), dtype=np.int64)
        else:  # mixed periodicity: ASE's binning handles it
            raise OverflowError
    except OverflowError:  # mixed periodicity, or points spread over more bins than int64 keys hold
        i, j, S = primitive_neighbor_list("ijS", pbc, np.asarray(cell_33, dtype=np.float64), positions,
                                          float(r_max), self_interaction=False)
        keep = i < n_centers
        i, j, S = i[keep], j[keep], S[keep]
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))  # deterministic: center, neighbour, shift
    return np.stack([i[order], j[order]]).astype(np.int64), S[order].astype(np.int64)


def periodic_images(positions_N3: np.ndarray, cell_33: np.ndarray, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Every periodic image an atom of the wrapped cell can see within r_max.

    Returns atom [M] and integer shifts T [M, 3]: image m sits at positions[atom[m]] + T[m] @ cell.
    The first N images are the atoms themselves wrapped into the cell (in order); the rest are
    the images whose fractional coordinates lie within r_max / h_k of the unit cube along each
    axis k (h_k the spacing of the lattice planes normal to axis k), which holds every neighbour
    of every wrapped atom.
    """
    volume = abs(np.linalg.det(cell_33))
    if volume < 1e-12:
        raise ValueError("a cell periodic in all three directions needs three independent cell vectors")
    frac = np.linalg.solve(cell_33.T, positions_N3.T).T
    wrap = -np.floor(frac)
    frac = frac + wrap  # in [0, 1] (1.0 only by rounding; the padding absorbs it)
    spacing = np.array([volume / np.linalg.norm(np.cross(cell_33[(k + 1) % 3], cell_33[(k + 2) % 3]))
                        for k in range(3)])
    pad = r_max / spacing * (1 + 1e-9) + 1e-12
    n_atoms = len(positions_N3)
    atoms, shifts = [np.arange(n_atoms)], [wrap.astype(np.int64)]
    reach = np.ceil(pad).astype(np.int64)
    for image in itertools.product(*(range(-r, r + 1) for r in reach)):
        if not any(image):
            continue
        f = frac + np.array(image)
        ids = np.flatnonzero(np.all((f >= -pad) & (f < 1 + pad), axis=1))
        atoms.append(ids)
        shifts.append(wrap[ids].astype(np.int64) + np.array(image, dtype=np.int64))
    return np.concatenate(atoms), np.concatenate(shifts)


def cell_list_pairs(points_M3: np.ndarray, n_centers: int, r_max: float,
                    chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, m), i < n_centers, m != i, |points[m] - points[i]| < r_max, by a cell list.

    Bins are cubes of side r_max keyed by their integer coordinates (only occupied bins exist, so
    sparse or far-flung points cost nothing extra); candidates are the points of the 27 bins
    around each center, done `chunk` centers at a time to bound memory.
    """
    lo = points_M3.min(axis=0)
    b3 = np.floor((points_M3 - lo) / r_max).astype(np.int64)
    dims = b3.max(axis=0) + 3  # room for the -1 / +1 offsets without wrapping
    if float(np.prod(dims.astype(np.float64))) > 2.0 ** 62:
        raise OverflowError("positions span too many cutoff-sized bins for int64 bin keys")
    key = ((b3[:, 0] + 1) * dims[1] + b3[:, 1] + 1) * dims[2] + b3[:, 2] + 1
    order = np.argsort(key, kind="stable")
    bins, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
    offset_keys = (_OFFSETS[:, 0] * dims[1] + _OFFSETS[:, 1]) * dims[2] + _OFFSETS[:, 2]
    r2 = r_max * r_max
    out_i, out_m = [], []
    for a in range(0, n_centers, chunk):
        centers = np.arange(a, min(a + chunk, n_centers))
        near = key[centers][:, None] + offset_keys[None, :]  # [c, 27]
        slot = np.minimum(np.searchsorted(bins, near), len(bins) - 1)
        found = bins[slot] == near
        count = np.where(found, counts[slot], 0).ravel()
        start = starts[slot].ravel()
        total = int(count.sum())
        first = np.cumsum(count) - count
        pos_in_order = np.repeat(start - first, count) + np.arange(total)
        m = order[pos_in_order]
        i = np.repeat(np.repeat(centers, len(_OFFSETS)), count)
        d = points_M3[m] - points_M3[i]
        keep = (np.einsum("ij,ij->i", d, d) < r2) & (m != i)
        out_i.append(i[keep])
        out_m.append(m[keep])
    return np.concatenate(out_i), np.concatenate(out_m)
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
