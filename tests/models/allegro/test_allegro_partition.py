"""Spatial partitioning is exact: the energy, per-atom energies, forces and virial computed domain
by domain (owned atoms + ghosts within r_max, ghost forces returned to their owners) equal the
single-domain result for slabs and grids, domains thinner than r_max, empty domains, a triclinic
cell and atoms exactly on domain boundaries.

Tolerance 1e-10 relative (float64): the same edges are summed in a different order and ghost
positions are rebuilt from wrapped fractional coordinates (~1e-15 relative each); a missing or
doubled ghost or edge changes forces at the 1e-2 level.
"""
from __future__ import annotations

import numpy as np
import pytest
from allegro_fixtures import R_MAX, cuni_supercell, tiny_model  # noqa: F401
from ase.build import bulk

from shipyard_models.allegro.calculator import predict
from shipyard_models.allegro.partition import decompose, plane_spacings, predict_partitioned


def assert_same(got: dict, want: dict) -> None:
    scale = np.abs(want["forces"]).max()
    assert scale > 1e-3
    np.testing.assert_allclose(got["energy"], want["energy"], rtol=1e-10)
    np.testing.assert_allclose(got["atom_energy"], want["atom_energy"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(got["virial"], want["virial"], rtol=0, atol=1e-10 * np.abs(want["virial"]).max())


def check(model, atoms, grid, skin=0.0):
    want = predict(model, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
    got = predict_partitioned(model, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, grid, skin)
    assert_same(got, want)
    return got


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (4, 1, 1), (1, 1, 8), (2, 2, 1), (2, 2, 2)],
                         ids=lambda g: "x".join(map(str, g)))
def test_partitioned_equals_single_domain(grid):
    model = tiny_model()
    atoms = cuni_supercell(seed=11, repeat=(3, 2, 2))  # 10.8 x 7.2 x 7.2 A: 8 slabs are 0.9 A thin
    got = check(model, atoms, grid, skin=0.3)
    if grid == (1, 1, 8):
        assert 7.2 / 8 < R_MAX and got["ghosts"] > 8 * len(atoms)  # thin domains: many images


def test_triclinic_cell_and_empty_domains():
    model = tiny_model()
    atoms = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))  # primitive fcc: a 60-degree rhombohedron
    atoms.rattle(0.1, seed=2)
    atoms.numbers[::3] = 28
    assert abs(atoms.cell.angles() - 60).max() < 1e-9
    check(model, atoms, (3, 1, 2))

    slab = cuni_supercell(seed=12, repeat=(2, 2, 2))
    slab.set_cell(slab.cell.array * [[2.5], [1], [1]], scale_atoms=False)  # vacuum along x
    slab.wrap()
    domains = decompose(slab.positions, slab.numbers, slab.cell.array, slab.pbc, (6, 1, 1), R_MAX)
    assert any(d.n_owned == 0 for d in domains)
    check(model, slab, (6, 1, 1))


def test_atoms_exactly_on_domain_boundaries():
    model = tiny_model()
    atoms = cuni_supercell(seed=13, repeat=(2, 2, 2), rattle=0.0)  # ideal fcc: planes at x = 0, a/2, ...
    atoms.positions[5] += [0.07, -0.05, 0.11]  # break the symmetry so forces are not all zero
    frac = atoms.get_scaled_positions(wrap=False)
    on_plane = np.isclose(frac[:, 0] * 4, np.round(frac[:, 0] * 4))
    assert on_plane.sum() >= len(atoms) // 2
    check(model, atoms, (4, 2, 1))
    check(model, atoms, (2, 2, 2))


def test_ghost_region_and_errors():
    atoms = cuni_supercell(seed=14, repeat=(3, 3, 3))
    h = plane_spacings(atoms.cell.array)
    np.testing.assert_allclose(h, np.diag(atoms.cell.array))  # cubic: plane spacing = edge
    domains = decompose(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, (3, 1, 1), R_MAX)
    assert sorted(np.concatenate([d.global_ids[:d.n_owned] for d in domains]).tolist()) == list(range(len(atoms)))
    for d in domains:  # every ghost lies within r_max of the domain slab (and none is missing: above)
        lo, hi = d.index * h[0] / 3, (d.index + 1) * h[0] / 3
        x = d.positions[d.n_owned:, 0]
        assert np.all((x >= lo - R_MAX - 1e-9) & (x < hi + R_MAX + 1e-9))
    with pytest.raises(ValueError, match="grid"):
        decompose(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, (2, 0, 1), R_MAX)
    with pytest.raises(ValueError, match="pbc"):
        decompose(atoms.positions, atoms.numbers, atoms.cell.array, [True, True, False], (2, 1, 1), R_MAX)


@pytest.mark.parametrize("grid", [(2, 2, 1), (3, 1, 2), (1, 1, 1)], ids=lambda g: "x".join(map(str, g)))
def test_vectorised_partitioner_finds_the_same_ghosts(grid):
    """`ghost_pairs` (the model-free partitioner used for cluster-scale planning) finds exactly the
    (domain, atom) ghost images `decompose` builds, on a box whose domains are >= 2 r_max wide."""
    from shipyard_models.allegro.partition import ghost_pairs, wrapped_fractional
    atoms = cuni_supercell(seed=15, repeat=(6, 4, 4))  # 21.6 x 14.4 x 14.4 A
    cell = atoms.cell.array
    domains = decompose(atoms.positions, atoms.numbers, cell, atoms.pbc, grid, R_MAX)
    want = sorted((d.index, int(a)) for d in domains for a in d.global_ids[d.n_owned:])
    owner, dom, ids = ghost_pairs(wrapped_fractional(atoms.positions, cell), grid, R_MAX / plane_spacings(cell))
    assert sorted(zip(dom.tolist(), ids.tolist())) == want
    for d in domains:
        assert sorted(np.flatnonzero(owner == d.index)) == sorted(d.global_ids[:d.n_owned])
