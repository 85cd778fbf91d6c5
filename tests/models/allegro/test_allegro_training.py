"""Allegro trains through the platform: `jobs/allegro/emt-cu.yaml`, shrunk, runs on 2 DDP workers
(real Ray, gloo; forces by autograd with create_graph under DDP), lowers the validation force
error of the untrained model, and its checkpoint loads into the ASE calculator, which runs MD and
a relaxation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from ase.units import fs

from shipyard.spec import load_job
from shipyard.train.data import collate
from shipyard.train.launch import run_job
from shipyard_models.allegro import FAMILY, AllegroCalculator, load_checkpoint

JOB = Path(__file__).resolve().parents[3] / "jobs" / "allegro" / "emt-cu.yaml"
TINY = ["model.num_channels=4", "model.latent_dim=16", "model.num_bessel=6", "model.r_max=4.0",
        "model.avg_num_neighbors=18.0", "data.n_structures=40", "train.steps=30", "train.batch_size=4",
        "train.lr=2.0e-2", "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=2",
        "train.checkpoint_every=0", "train.log_every=10", "tracking.experiment=allegro-test"]


@pytest.mark.slow
def test_emt_cu_job_trains_and_its_checkpoint_drives_ase(ray_cluster, shipyard_home):
    spec = load_job(JOB, TINY)
    records: list[dict] = []
    result = run_job(spec, on_record=records.append, quiet=True)
    assert result.status == "FINISHED", result.error
    trained = load_checkpoint(result.checkpoint)

    # The same validation batches as the run, scored by the untrained model (same seed) and the
    # trained one: a short run must cut the force error (EMT forces here have RMS ~0.6 eV/A).
    _, val = FAMILY.datasets(spec.model, spec.data, Path(shipyard_home) / "data")
    batch = collate([val[i] for i in range(len(val))])
    torch.manual_seed(spec.train.seed)
    untrained = FAMILY.build(spec.model).double().eval()
    before = FAMILY.evaluate(untrained, batch)["force_rmse"].item()
    after = FAMILY.evaluate(trained, batch)["force_rmse"].item()
    print(f"val force RMSE: untrained {before:.3f}, after {spec.train.steps} steps {after:.3f} eV/A")
    assert after < 0.7 * before
    assert "val/force_mae" in result.metrics and "val/energy_mae_per_atom" in result.metrics
    assert torch.all(trained.species_scale != 1)  # training-set statistics were installed

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    atoms.calc = AllegroCalculator(checkpoint=result.checkpoint)
    dyn = VelocityVerlet(atoms, 1 * fs)
    e0 = atoms.get_potential_energy() + atoms.get_kinetic_energy()
    dyn.run(5)
    e5 = atoms.get_potential_energy() + atoms.get_kinetic_energy()
    assert abs(e5 - e0) < 1e-3 * len(atoms)  # NVE with a smooth potential conserves energy
    assert atoms.get_stress().shape == (6,)
    assert BFGS(atoms, logfile=None).run(fmax=1e-3, steps=100)  # converged
    assert np.abs(atoms.get_forces()).max() < 1e-3
