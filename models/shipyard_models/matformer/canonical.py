"""A canonical unit cell, so that Matformer's periodic-pattern edges do not depend on the cell the
user happened to choose.

The neighbour edges of `graph.periodic_graph` describe the infinite crystal and do not depend on
the cell; the 12 pattern self-loops per atom carry |a|, |b|, |c|, |a+b|, |a+c|, |b+c| of the cell
as given, so a supercell or another basis of the same lattice changes the prediction.
`canonicalize` maps every cell of a crystal to one cell: the primitive cell (the smallest cell
that repeats the structure, found from the pure translations that map the crystal onto itself)
followed by Niggli reduction (ASE's implementation of Krivy-Gruber / Grosse-Kunstleve et al.),
whose metric (the cell's lengths and angles) is unique for a lattice. Every choice then leads to
the same pattern lengths and the same prediction (tested).

spglib (what the issue suggests) is not installed here; the primitive search below is the
translation part of what spglib does, with no point-group analysis, which the graph does not need.
"""
from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from ase.build import niggli_reduce


def pure_translations(numbers: np.ndarray, frac: np.ndarray, cell: np.ndarray,
                      tol: float) -> np.ndarray:
    """Fractional translations t (not lattice vectors, in [0, 1)) that map the structure onto
    itself, species by species, within `tol` A. [T, 3]; empty for a primitive cell."""
    species, counts = np.unique(numbers, return_counts=True)
    anchor_species = species[np.argmin(counts)]
    anchor = int(np.flatnonzero(numbers == anchor_species)[0])
    found = []
    for j in np.flatnonzero(numbers == anchor_species):
        if j == anchor:
            continue
        t = frac[j] - frac[anchor]
        t = t - np.floor(t)
        moved = frac + t
        diff = moved[:, None, :] - frac[None, :, :]
        diff -= np.round(diff)
        dist = np.linalg.norm(diff @ cell, axis=-1)
        same = numbers[:, None] == numbers[None, :]
        if (np.where(same, dist, np.inf).min(axis=1) < tol).all():
            found.append(t)
    return np.array(found).reshape(-1, 3)


def _lattice_basis(generators: np.ndarray) -> np.ndarray:
    """A basis (3 rows) of the integer lattice spanned by integer row vectors (row echelon form
    by Euclid's algorithm on Python ints)."""
    rows = [list(map(int, r)) for r in generators]
    basis = []
    for col in range(3):
        while True:
            live = [r for r in rows if r[col] != 0]
            if len(live) <= 1:
                break
            live.sort(key=lambda r: abs(r[col]))
            pivot = live[0]
            for r in live[1:]:
                q = r[col] // pivot[col]
                for c in range(3):
                    r[c] -= q * pivot[c]
        pivots = [r for r in rows if r[col] != 0]
        assert len(pivots) == 1, "three independent generators span the full lattice"
        basis.append(pivots[0])
        rows = [r for r in rows if r[col] == 0 and any(r)]
    return np.array(basis, dtype=np.int64)


def primitive(atoms: Atoms, tol: float = 1e-4) -> Atoms:
    """The structure in a primitive cell (positions wrapped into it; cell not yet reduced)."""
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    numbers = atoms.numbers
    frac = atoms.positions @ np.linalg.inv(cell)
    frac -= np.floor(frac)
    trans = pure_translations(numbers, frac, cell, tol)
    if len(trans) == 0:
        out = Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
        return out
    index = len(trans) + 1  # translations modulo the lattice form a group of this order
    if len(atoms) % index:
        raise ValueError(f"found {len(trans)} pure translations for {len(atoms)} atoms; "
                         f"lower the tolerance (tol={tol})")
    scaled = np.concatenate([index * np.eye(3), np.round(trans * index)])
    if np.abs(trans * index - np.round(trans * index)).max() > 1e-3:
        raise ValueError(f"inconsistent pure translations at tol={tol}; lower the tolerance")
    basis = _lattice_basis(scaled.astype(np.int64))
    new_cell = (basis / index) @ cell
    assert math.isclose(abs(np.linalg.det(new_cell)) * index, abs(np.linalg.det(cell)), rel_tol=1e-6)
    new_frac = atoms.positions @ np.linalg.inv(new_cell)
    new_frac -= np.floor(new_frac)
    keep: list[int] = []
    for i in range(len(atoms)):
        diff = new_frac[keep] - new_frac[i]
        diff -= np.round(diff)
        if not keep or np.linalg.norm(diff @ new_cell, axis=1).min() >= tol:
            keep.append(i)
    assert len(keep) * index == len(atoms), (len(keep), index, len(atoms))
    return Atoms(numbers=numbers[keep], scaled_positions=new_frac[keep], cell=new_cell, pbc=True)


def canonicalize(atoms: Atoms, tol: float = 1e-4) -> Atoms:
    """Primitive cell, Niggli-reduced, atoms wrapped into it. The prediction of a Matformer on the
    result is the same for every supercell and every cell choice of the same crystal."""
    if not all(atoms.pbc):
        raise ValueError("canonicalize needs a crystal periodic along all three cell vectors")
    out = primitive(atoms, tol)
    niggli_reduce(out)
    out.wrap()
    return out
