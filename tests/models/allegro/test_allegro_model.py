"""Properties the Allegro paper promises, in float64: E(3) equivariance (energies invariant,
forces rotate, the virial transforms as R W R^T), permutation equivariance, strict locality
(exactly zero partial forces beyond r_max, additive far-apart clusters), and forces and virial
equal to finite differences of the energy.

Tolerances: float64 round-off on ~1e3 edge terms is ~1e-14 relative; 1e-10 leaves room for
summation-order differences and still fails on any real symmetry breaking (those show at 1e-3).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from allegro_fixtures import R_MAX, cuni_supercell, tiny_model  # noqa: F401
from ase import Atoms
from scipy.spatial.transform import Rotation

from shipyard_models.allegro.calculator import predict
from shipyard_models.allegro.model import Allegro, Config, polynomial_cutoff

TOL = dict(rtol=1e-10, atol=1e-10)


def run(model, atoms: Atoms):
    return predict(model, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation(reflect):
    model, atoms = tiny_model(), cuni_supercell(seed=1)
    ref = run(model, atoms)
    R = Rotation.random(random_state=3).as_matrix()
    if reflect:
        R = R @ np.diag([1.0, 1.0, -1.0])
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    moved.positions = atoms.positions @ R.T + np.array([0.3, -1.7, 2.2])
    out = run(model, moved)
    np.testing.assert_allclose(out["energy"], ref["energy"], **TOL)
    np.testing.assert_allclose(out["atom_energy"], ref["atom_energy"], **TOL)
    np.testing.assert_allclose(out["forces"], ref["forces"] @ R.T, **TOL)
    np.testing.assert_allclose(out["virial"], R @ ref["virial"] @ R.T, **TOL)
    assert np.abs(ref["forces"]).max() > 1e-3  # the check above is not vacuous


def test_permutation_equivariance():
    model, atoms = tiny_model(), cuni_supercell(seed=2)
    perm = np.random.default_rng(0).permutation(len(atoms))
    ref, out = run(model, atoms), run(model, atoms[perm])
    np.testing.assert_allclose(out["energy"], ref["energy"], **TOL)
    np.testing.assert_allclose(out["atom_energy"], ref["atom_energy"][perm], **TOL)
    np.testing.assert_allclose(out["forces"], ref["forces"][perm], **TOL)


def test_partial_forces_beyond_r_max_are_exactly_zero():
    """d e_b / d x_a is exactly 0 for |x_a - x_b| >= r_max, and not 0 for some atom inside."""
    model = tiny_model()
    atoms = cuni_supercell(seed=3, repeat=(2, 2, 2))
    atoms.pbc = False
    pos = torch.tensor(atoms.positions, requires_grad=True)
    from shipyard_models.allegro.neighbors import neighbor_list
    ei, _ = neighbor_list(atoms.positions, np.zeros((3, 3)), [False] * 3, R_MAX)
    vec = pos[ei[1]] - pos[ei[0]]
    e = model(torch.tensor(atoms.numbers), torch.from_numpy(ei), vec, torch.ones(len(atoms), dtype=torch.bool))
    b = 13
    (grad,) = torch.autograd.grad(e[b], pos)
    dist = np.linalg.norm(atoms.positions - atoms.positions[b], axis=1)
    far = dist >= R_MAX
    assert far.sum() > 10 and (~far).sum() >= 4  # itself and at least three neighbours
    assert torch.all(grad[torch.from_numpy(far)] == 0)
    assert grad[torch.from_numpy(~far)].abs().max() > 1e-4


def test_far_apart_clusters_energies_add():
    model = tiny_model()
    a = cuni_supercell(seed=4, repeat=(1, 1, 2))
    b = cuni_supercell(seed=5, repeat=(2, 1, 1))
    for x in (a, b):
        x.pbc = False
    b.positions += np.array([3 * R_MAX + 20.0, 0.0, 0.0])
    together = a + b
    ea, eb, eab = run(model, a), run(model, b), run(model, together)
    np.testing.assert_allclose(eab["energy"], ea["energy"] + eb["energy"], rtol=1e-13)
    np.testing.assert_array_equal(eab["atom_energy"], np.concatenate([ea["atom_energy"], eb["atom_energy"]]))
    np.testing.assert_array_equal(eab["forces"], np.concatenate([ea["forces"], eb["forces"]]))


def test_forces_and_virial_match_finite_differences():
    """Directional central differences (h = 1e-5, float64) along random displacements and random
    non-symmetric strains: truncation ~h^2 |E'''| ~ 1e-9, round-off ~1e-16 |E| / h ~ 1e-10, so
    1e-6 absolute on derivatives of order 0.1-1 eV still fails on any real error."""
    model, atoms = tiny_model(), cuni_supercell(seed=6, repeat=(2, 1, 1))
    ref = run(model, atoms)
    h = 1e-5
    rng = np.random.default_rng(0)
    for _ in range(3):
        D = rng.normal(size=atoms.positions.shape)
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions = atoms.positions + sign * h * D
            energies.append(run(model, moved)["energy"])
        fd = (energies[0] - energies[1]) / (2 * h)
        assert abs(fd) > 1e-2
        assert abs(fd + (ref["forces"] * D).sum()) < 1e-6, (fd, -(ref["forces"] * D).sum())
    for _ in range(3):
        eps = rng.normal(size=(3, 3))
        energies = []
        for sign in (1, -1):
            F = np.eye(3) + sign * h * eps
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ F, scale_atoms=False)
            strained.positions = atoms.positions @ F
            energies.append(run(model, strained)["energy"])
        fd = (energies[0] - energies[1]) / (2 * h)
        assert abs(fd) > 1e-2
        assert abs(fd + (ref["virial"] * eps).sum()) < 1e-6, (fd, -(ref["virial"] * eps).sum())
    np.testing.assert_allclose(ref["virial"], ref["virial"].T, atol=1e-10)  # rotation invariance


def test_cutoff_is_smooth_and_zero_beyond_r_max():
    r = torch.tensor([0.0, 2.0, 3.99, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    u = polynomial_cutoff(r, 4.0, 6)
    (du,) = torch.autograd.grad(u.sum(), r)
    assert u[0] == 1 and u[3] == 0 and u[4] == 0 and 0 < u[2] < 1e-4
    assert du[3] == 0 and abs(du[2]) < 1e-2  # the derivative goes to 0 continuously


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="species"):
        Config(species=["Xx"])
    with pytest.raises(ValueError, match="l_max"):
        Config(l_max=7)
    model = Allegro(Config(species=["Cu"]))
    with pytest.raises(ValueError, match=r"atomic numbers \[28\]"):
        model.types(torch.tensor([29, 28]))
