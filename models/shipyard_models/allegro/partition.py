"""Spatial partitioning of a periodic box into domains, the reason Allegro scales (paper, Sec. 2).

Each of the gx x gy x gz domains is a box in *fractional* coordinates, so any cell shape works
(triclinic included). A domain owns the atoms whose wrapped fractional coordinates fall in its box,
and holds as ghosts every periodic image of every atom within r_max + skin of that box: the box is
padded along axis k by (r_max + skin) / h_k, h_k the distance between the cell's lattice planes
normal to axis k, which covers the whole r_max-neighbourhood in real space. Domains thinner than
r_max just hold more ghosts (several images of one atom, their own owned atoms' images among them).

Because an Allegro energy e_i depends only on atoms within r_max of i, a domain evaluates its owned
atoms' energies exactly from owned + ghost atoms with edges only from owned centers; the partial
forces it finds on ghosts belong to their owners and are summed there, and the virials of the
domains add up. `predict_partitioned` does this in one process; the platform runs the same
`evaluate_domain` in one Ray actor per domain (shipyard.md).

Shapes: N atoms in the box, n local atoms of a domain (owned first, then ghosts), E edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import Allegro, energy_forces_virial
from .neighbors import neighbor_list


@dataclass
class Domain:
    """One domain's atoms: `global_ids[:n_owned]` are owned, the rest ghost images."""

    index: int
    n_owned: int
    global_ids: np.ndarray
    """[n] index into the box's atoms of each local atom."""
    positions: np.ndarray
    """[n, 3] Cartesian positions of the local images (unwrapped around the domain)."""
    numbers: np.ndarray
    """[n] atomic numbers."""

    @property
    def n_ghosts(self) -> int:
        return len(self.global_ids) - self.n_owned


def plane_spacings(cell_33: np.ndarray) -> np.ndarray:
    """h_k = volume / |a_l x a_m|: the distance between lattice planes normal to axis k."""
    volume = abs(np.linalg.det(cell_33))
    return np.array([volume / np.linalg.norm(np.cross(cell_33[(k + 1) % 3], cell_33[(k + 2) % 3]))
                     for k in range(3)])


def check_grid(grid) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive domain counts (gx, gy, gz), got {grid}")
    return grid


def wrapped_fractional(positions_N3: np.ndarray, cell_33: np.ndarray) -> np.ndarray:
    frac = np.linalg.solve(cell_33.T, np.asarray(positions_N3, dtype=np.float64).T).T
    frac -= np.floor(frac)
    frac[frac >= 1.0] = 0.0  # -1e-17 wraps to 1.0 in floating point: it is 0
    return frac


def assign(frac_N3: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Domain index of each atom (row-major over gx, gy, gz) from wrapped fractional coordinates."""
    g = np.array(grid)
    cell_idx = np.minimum((frac_N3 * g).astype(np.int64), g - 1)
    return (cell_idx[:, 0] * g[1] + cell_idx[:, 1]) * g[2] + cell_idx[:, 2]


def decompose(positions_N3, numbers_N, cell_33, pbc_3, grid, r_max: float, skin: float = 0.0) -> list[Domain]:
    """Split a 3D-periodic box into `grid` domains with ghosts within r_max + skin."""
    grid = check_grid(grid)
    if not np.all(pbc_3):
        raise ValueError(f"partitioning needs a box periodic in all three directions, got pbc={list(pbc_3)}")
    if r_max <= 0 or skin < 0:
        raise ValueError(f"r_max must be positive and skin >= 0, got r_max={r_max}, skin={skin}")
    cell = np.asarray(cell_33, dtype=np.float64)
    frac = wrapped_fractional(positions_N3, cell)
    numbers = np.asarray(numbers_N)
    owner = assign(frac, grid)
    pad = (r_max + skin) / plane_spacings(cell)
    domains = []
    for d in range(math.prod(grid)):
        c = np.unravel_index(d, grid)
        lo = np.array([c[k] / grid[k] for k in range(3)])
        hi = np.array([(c[k] + 1) / grid[k] for k in range(3)])
        owned = np.flatnonzero(owner == d)
        ghost_ids, ghost_frac = [], []
        ranges = [range(math.floor(lo[k] - pad[k]) - 1, math.ceil(hi[k] + pad[k]) + 1) for k in range(3)]
        for n in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T:
            s = frac + n
            inside = np.all((s >= lo - pad) & (s < hi + pad), axis=1)
            if not n.any():
                inside &= owner != d  # the owned originals are already in
            ids = np.flatnonzero(inside)
            ghost_ids.append(ids)
            ghost_frac.append(s[ids])
        ids = np.concatenate([owned, *ghost_ids])
        f = np.concatenate([frac[owned], *ghost_frac])
        domains.append(Domain(index=d, n_owned=len(owned), global_ids=ids, positions=f @ cell, numbers=numbers[ids]))
    return domains


def evaluate_domain(model: Allegro, domain: Domain, dtype: torch.dtype = torch.float64) -> dict[str, np.ndarray]:
    """Owned atoms' energies [n_owned], forces on every local atom [n, 3] and the domain's virial."""
    n = len(domain.global_ids)
    if domain.n_owned == 0:
        return {"atom_energy": np.zeros(0), "forces": np.zeros((n, 3)), "virial": np.zeros((3, 3))}
    edge_index, _ = neighbor_list(domain.positions, np.zeros((3, 3)), [False] * 3, model.cfg.r_max,
                                  centers=domain.n_owned)
    owned = torch.zeros(n, dtype=torch.bool)
    owned[:domain.n_owned] = True
    out = energy_forces_virial(model, torch.as_tensor(domain.numbers, dtype=torch.long),
                               torch.as_tensor(domain.positions, dtype=dtype), torch.from_numpy(edge_index),
                               torch.zeros(edge_index.shape[1], 3, dtype=dtype), owned)
    return {"atom_energy": out["atom_energy"][:domain.n_owned].detach().numpy(),
            "forces": out["forces"].detach().numpy(), "virial": out["virial"][0].detach().numpy()}


def gather(domains: list[Domain], results: list[dict[str, np.ndarray]], n_atoms: int) -> dict:
    """Per-atom energies from owners, forces summed over every domain holding an image, virials
    summed: the whole box's energy, atom energies, forces and virial."""
    atom_energy = np.zeros(n_atoms)
    forces = np.zeros((n_atoms, 3))
    virial = np.zeros((3, 3))
    for dom, res in zip(domains, results):
        atom_energy[dom.global_ids[:dom.n_owned]] = res["atom_energy"]
        np.add.at(forces, dom.global_ids, res["forces"])
        virial += res["virial"]
    return {"energy": float(atom_energy.sum()), "atom_energy": atom_energy, "forces": forces, "virial": virial}


def predict_partitioned(model: Allegro, positions_N3, numbers_N, cell_33, pbc_3, grid, skin: float = 0.0,
                        dtype: torch.dtype = torch.float64) -> dict:
    """`calculator.predict` computed domain by domain in this process (the reference for the
    distributed version, and the definition of what each actor computes)."""
    domains = decompose(positions_N3, numbers_N, cell_33, pbc_3, grid, model.cfg.r_max, skin)
    results = [evaluate_domain(model, d, dtype) for d in domains]
    out = gather(domains, results, len(positions_N3))
    out["ghosts"] = sum(d.n_ghosts for d in domains)
    return out


def ghost_pairs(frac_N3: np.ndarray, grid, pad_3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partitioner alone, vectorised over all domains, for cluster-scale planning.

    For every atom, the domains (other than its owner) whose padded box holds one of its images:
    along each axis an atom is a ghost of the next domain down if it lies within pad of its
    domain's lower face, of the next one up if within pad of the upper face; the 26 combinations of
    the three axes give the rest. Needs domains at least 2 * pad wide along every axis (then no
    atom is near both faces of its domain; `decompose` handles thinner ones). A pair is one
    image, so with 1 or 2 domains along an axis an atom can be a ghost of its own domain or twice
    of another, as in `decompose`. O(27 N) work, no model.
    Returns owner [N], and the ghost pairs as domain [G] and atom [G] indices.
    """
    grid = np.array(check_grid(grid))
    if np.any(1.0 / grid < 2 * np.asarray(pad_3)):
        raise ValueError(f"ghost_pairs needs domains at least 2 * (r_max + skin) wide; grid {tuple(grid)} is "
                         f"too fine for this cell (use decompose)")
    c = np.minimum((frac_N3 * grid).astype(np.int64), grid - 1)
    offset = frac_N3 * grid - c  # position inside the own domain, in units of the domain width
    near = [{-1: offset[:, k] < pad_3[k] * grid[k], 0: None, 1: offset[:, k] >= 1 - pad_3[k] * grid[k]}
            for k in range(3)]
    owner = (c[:, 0] * grid[1] + c[:, 1]) * grid[2] + c[:, 2]
    domains, atoms = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                if dx == dy == dz == 0:
                    continue
                mask = np.ones(len(frac_N3), dtype=bool)
                for k, d in enumerate((dx, dy, dz)):
                    if d:
                        mask &= near[k][d]
                ids = np.flatnonzero(mask)
                n = (c[ids] + np.array([dx, dy, dz])) % grid
                domains.append((n[:, 0] * grid[1] + n[:, 1]) * grid[2] + n[:, 2])
                atoms.append(ids)
    return owner, np.concatenate(domains), np.concatenate(atoms)
