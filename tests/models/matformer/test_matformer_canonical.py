"""The canonical cell: supercells fold back to the primitive cell, and every basis of the lattice
(rotated, reflected, skewed) reduces to the same Niggli metric (lengths and angles)."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from shipyard_models.matformer.canonical import canonicalize


def metric(atoms):
    cell = atoms.cell[:]
    return cell @ cell.T


def alloy():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[1, 3]] = 79
    atoms.positions += np.random.default_rng(0).normal(0, 0.05, atoms.positions.shape)
    return atoms


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 1, 1), (2, 3, 1), (2, 2, 2)])
def test_supercells_fold_back(reps):
    atoms = alloy()
    canon = canonicalize(atoms.repeat(reps))
    assert len(canon) == len(atoms)
    assert sorted(canon.numbers) == sorted(atoms.numbers)
    np.testing.assert_allclose(metric(canon), metric(canonicalize(atoms)), atol=1e-8)
    assert abs(canon.get_volume() - atoms.get_volume()) < 1e-8


def test_conventional_cells_reduce_to_primitive():
    assert len(canonicalize(bulk("Cu", "fcc", a=3.6, cubic=True))) == 1
    assert len(canonicalize(bulk("Fe", "bcc", a=2.87, cubic=True))) == 1
    hcp = canonicalize(bulk("Mg", "hcp", a=3.2, c=5.2).repeat((1, 2, 2)))
    assert len(hcp) == 2
    np.testing.assert_allclose(sorted(hcp.cell.lengths()), [3.2, 3.2, 5.2], atol=1e-8)


def test_other_bases_and_orientations_share_the_niggli_metric():
    atoms = alloy()
    a, b, c = atoms.cell[:]
    want = metric(canonicalize(atoms))
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))  # may include a reflection
    for cell in ([a + b, b, c - 2 * a], [b, -a, c + a + b], [c, a, b]):
        other = Atoms(atoms.numbers, positions=atoms.positions @ q.T, cell=np.array(cell) @ q.T, pbc=True)
        other.wrap()
        np.testing.assert_allclose(metric(canonicalize(other)), want, atol=1e-8)


def test_non_periodic_input_is_refused():
    with pytest.raises(ValueError, match="periodic"):
        canonicalize(Atoms("Cu", positions=[[0, 0, 0]], cell=np.eye(3) * 3, pbc=[True, True, False]))
