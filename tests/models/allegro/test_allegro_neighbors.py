"""The cell-list neighbour search finds exactly ASE's pairs (with image shifts), and evaluating
energy + forces in blocks of centers gives the single-block result.

ASE's `primitive_neighbor_list` is an independent implementation of the same definition
(|x_j + S @ cell - x_i| < r_max, no self pair), so equal pair sets are a real check; the cases
cover what a cell list gets wrong: cells smaller than r_max (several images of one atom),
triclinic cells, positions outside the cell, open boundaries, widely spread points.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from allegro_fixtures import R_MAX, cuni_supercell, tiny_model  # noqa: F401
from ase.build import bulk
from ase.neighborlist import primitive_neighbor_list

from shipyard_models.allegro.model import energy_forces_virial
from shipyard_models.allegro.neighbors import neighbor_list


def ase_pairs(atoms, r_max, centers=None):
    i, j, S = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.array, atoms.positions, r_max,
                                      self_interaction=False)
    keep = i < (centers if centers is not None else len(atoms))
    return sorted(zip(i[keep].tolist(), j[keep].tolist(), *S[keep].T.tolist()))


def our_pairs(atoms, r_max, centers=None):
    ei, S = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, r_max, centers=centers)
    return sorted(zip(ei[0].tolist(), ei[1].tolist(), *S.T.tolist()))


def structures():
    cubic = cuni_supercell(seed=1, repeat=(3, 3, 3))
    triclinic = bulk("Cu", "fcc", a=3.6).repeat((2, 3, 2))
    triclinic.rattle(0.1, seed=2)
    triclinic.positions += np.array([7.0, -11.0, 3.0])  # outside the cell: wrapped by the search
    single = bulk("Cu", "fcc", a=3.6)  # one atom, a cell far smaller than r_max
    cluster = cuni_supercell(seed=3, repeat=(2, 2, 2))
    cluster.pbc = False
    spread = cluster.copy()
    spread.positions[::5] += np.array([1e4, -3e3, 0.0])  # far-apart groups: sparse bins
    huge = cluster.copy()
    huge.positions[::5] += np.array([1e15, 3e14, 1e13])  # more bins than int64 keys: the ASE fallback
    slab = cuni_supercell(seed=4, repeat=(2, 2, 2))
    slab.pbc = [True, True, False]  # mixed periodicity: the ASE fallback
    return {"cubic": cubic, "triclinic": triclinic, "single": single, "cluster": cluster, "spread": spread,
            "huge": huge, "slab": slab}


@pytest.mark.parametrize("name", list(structures()))
@pytest.mark.parametrize("r_max", [R_MAX, 6.5])
def test_cell_list_finds_ases_pairs(name, r_max):
    atoms = structures()[name]
    want = ase_pairs(atoms, r_max)
    assert len(want) > 0
    assert our_pairs(atoms, r_max) == want


def test_centers_keep_only_the_first_atoms_edges_and_order_is_by_center():
    atoms = structures()["cluster"]
    assert our_pairs(atoms, R_MAX, centers=11) == ase_pairs(atoms, R_MAX, centers=11)
    ei, S = neighbor_list(atoms.positions, np.zeros((3, 3)), [False] * 3, R_MAX)
    assert np.all(np.diff(ei[0]) >= 0) and not S.any()


def test_degenerate_periodic_cell_is_a_clear_error():
    with pytest.raises(ValueError, match="three independent cell vectors"):
        neighbor_list(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], np.diag([3.0, 3.0, 0.0]), [True] * 3, R_MAX)


def graph(atoms):
    ei, S = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, R_MAX)
    cell = torch.tensor(atoms.cell.array)
    return (torch.tensor(atoms.numbers), torch.tensor(atoms.positions), torch.from_numpy(ei),
            torch.from_numpy(S).double() @ cell, torch.ones(len(atoms), dtype=torch.bool))


@pytest.mark.parametrize("max_edges", [1, 37, 500, None])
def test_blocked_evaluation_equals_one_block(max_edges):
    """Blocks only reorder sums: float64 round-off (~1e-15 relative here), hence 1e-12."""
    model, atoms = tiny_model(), cuni_supercell(seed=5, repeat=(3, 2, 2))
    args = graph(atoms)
    want = energy_forces_virial(model, *args, training=True)  # one block
    got = energy_forces_virial(model, *args, max_edges=max_edges)
    for key in ("atom_energy", "energy", "forces", "virial"):
        torch.testing.assert_close(got[key], want[key].detach(), rtol=1e-12, atol=1e-12)
    assert want["forces"].abs().max() > 1e-3


def test_blocked_evaluation_with_unsorted_edges_and_two_structures():
    model = tiny_model()
    a, b = cuni_supercell(seed=6), cuni_supercell(seed=7, repeat=(2, 2, 1))
    ga, gb = graph(a), graph(b)
    n = len(a)
    numbers = torch.cat([ga[0], gb[0]])
    positions = torch.cat([ga[1], gb[1]])
    edges = torch.cat([ga[2], gb[2] + n], dim=1)
    shifts = torch.cat([ga[3], gb[3]])
    perm = torch.randperm(edges.shape[1], generator=torch.Generator().manual_seed(0))
    graph_of = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(len(b), dtype=torch.long)])
    owned = torch.ones(len(numbers), dtype=torch.bool)
    got = energy_forces_virial(model, numbers, positions, edges[:, perm], shifts[perm], owned, graph_of, 2,
                               max_edges=50)
    for g, args in ((0, ga), (1, gb)):
        want = energy_forces_virial(model, *args)
        rows = slice(0, n) if g == 0 else slice(n, None)
        torch.testing.assert_close(got["energy"][g], want["energy"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["forces"][rows], want["forces"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["virial"][g], want["virial"][0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="max_edges"):
        energy_forces_virial(model, *ga, max_edges=0)


def test_atoms_without_edges_get_their_shift_and_no_force():
    """No pair within r_max: empty edge tensors all the way through (blocked and one block)."""
    model = tiny_model()
    atoms = cuni_supercell(seed=8, repeat=(1, 1, 1))[:2]
    atoms.pbc = False
    atoms.positions[1] = atoms.positions[0] + [10.0, 0.0, 0.0]
    args = graph(atoms)
    assert args[2].shape[1] == 0
    shift = model.species_shift[model.types(args[0])]
    for kwargs in ({}, {"training": True}):
        out = energy_forces_virial(model, *args, **kwargs)
        torch.testing.assert_close(out["atom_energy"].detach(), shift, rtol=0, atol=1e-15)
        assert not out["forces"].any() and not out["virial"].any()
