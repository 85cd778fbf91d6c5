"""The partitioned potential on real Ray actors (the session's local cluster): energies, atom
energies, forces and virial equal the single-domain model for one actor per domain and for two
actors sharing more domains (thin and empty domains included), and a short partitioned NVE run on
2 actors follows the single-domain trajectory.

Tolerances as in test_allegro_partition.py (1e-10 relative: summation order only); trajectories:
10 steps amplify 1e-15 force differences by far less than 1e-9 A.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from allegro_fixtures import cuni_supercell, tiny_model  # noqa: F401
from ase.units import fs
from test_allegro_partition import assert_same

from shipyard.md.actors import PartitionedPotential
from shipyard_models.allegro.calculator import predict
from shipyard_models.allegro.md import velocity_verlet

MODEL = tiny_model()


@pytest.fixture(scope="module")
def potential(ray_cluster):
    """Two actors, started once for the module (actor start-up dominates these tests)."""
    pot = PartitionedPotential(MODEL, (2, 1, 1), skin=0.2)
    yield pot
    pot.shutdown()


def test_two_actors_equal_the_single_domain_model(potential):
    atoms = cuni_supercell(seed=31, repeat=(3, 2, 2))
    want = predict(MODEL, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
    assert len(potential.actors) == 2
    for grid in [(2, 1, 1), (2, 2, 1), (1, 1, 8)]:  # one domain per actor, then 2 and 4 per actor
        potential.set_grid(grid)
        assert_same(potential(atoms.positions, atoms.numbers, atoms.cell.array), want)

    slab = atoms.copy()
    slab.set_cell(slab.cell.array * [[2.0], [1], [1]], scale_atoms=False)  # vacuum: empty domains
    slab.wrap()
    want = predict(MODEL, slab.positions, slab.numbers, slab.cell.array, slab.pbc)
    potential.set_grid((4, 1, 1))
    got = potential(slab.positions, slab.numbers, slab.cell.array)
    assert any(d.n_owned == 0 for d in potential.last_domains)
    assert_same(got, want)
    with pytest.raises(ValueError, match="num_actors"):
        potential.set_grid((1, 1, 1))


def test_partitioned_nve_on_two_actors_follows_single_domain(potential):
    atoms = cuni_supercell(seed=32, repeat=(2, 2, 1), rattle=0.05)
    rng = np.random.default_rng(0)
    v0 = rng.normal(scale=0.02, size=atoms.positions.shape)  # ~ 300 K in A per ASE time unit
    args = (atoms.positions, v0, atoms.get_masses(), 2 * fs, 10)
    cell, numbers = atoms.cell.array, atoms.numbers

    single = velocity_verlet(lambda x: predict(MODEL, x, numbers, cell, atoms.pbc), *args)
    potential.set_grid((2, 1, 1))
    parted = velocity_verlet(lambda x: potential(x, numbers, cell), *args)
    for a, b in zip(single, parted):
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-9)
        assert b.total_energy == pytest.approx(a.total_energy, rel=1e-10)
    assert np.abs(single[-1].positions - single[0].positions).max() > 0.05  # atoms did move


def test_md_partitioned_job_runs_on_actors_and_writes_a_trajectory(ray_cluster, tmp_path):
    """`jobs/allegro/md-partitioned.yaml`'s MD stage, shrunk (32 atoms, 6 steps), from a
    checkpoint directory as the platform writes it. Atoms of the ideal fcc start sit exactly on
    the domain boundaries (x = 0 and x = L/2), so thermal motion makes them migrate."""
    from ase.io import read
    from test_allegro_calculator import write_checkpoint

    from shipyard.md.run import run_md
    from shipyard.spec import load_job

    job = Path(__file__).resolve().parents[3] / "jobs" / "allegro" / "md-partitioned.yaml"
    spec = load_job(job, ["data.md.supercell=2", "data.md.steps=6", "data.md.write_every=2",
                          "data.md.temperature=600.0", "model.species=[Cu, Ni]"])
    checkpoint = write_checkpoint(tiny_model(), tmp_path / "checkpoint")
    summary = run_md(spec, checkpoint, tmp_path / "md.extxyz")
    frames = read(str(tmp_path / "md.extxyz"), index=":")
    assert [f.info["step"] for f in frames] == [0, 2, 4, 6]
    assert summary["atoms"] == 32 and summary["actors"] == 2 and summary["migrations"] > 0
    assert summary["energy_max_error_per_atom"] < 1e-3  # 2 fs Verlet on a smooth potential
    assert summary["ghosts_per_owned"] > 1  # thin 3.6 A domains with r_max 3.2 + skin 0.5


def test_actors_the_cluster_cannot_place_time_out_with_a_clear_error(ray_cluster):
    """More actors than the session cluster's 4 CPUs: a real unplaceable actor, which used to leave
    the first force call blocked for ever; now the constructor gives up after timeout_s."""
    with pytest.raises(TimeoutError, match="did not all start within 3.0 s.*CPUs free"):
        PartitionedPotential(MODEL, (8, 1, 1), num_actors=8, timeout_s=3.0)
