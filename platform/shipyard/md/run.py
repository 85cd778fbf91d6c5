"""The partitioned NVE MD stage of an Allegro job: `python -m shipyard.md JOB [--checkpoint DIR]`.

It loads the trained checkpoint (default: the newest complete one of the job's local runs),
builds an fcc supercell of `data.element` with Maxwell-Boltzmann velocities, and integrates
velocity Verlet with forces from `PartitionedPotential` (one Ray actor per domain; the partition,
and so atom migration and the ghosts, is rebuilt at every step). Frames go to an extxyz
trajectory; the summary reports the energy drift, migrations and ghosts per step.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shipyard.cluster import connect, home
from shipyard.md.actors import PartitionedPotential
from shipyard.spec import JobSpec, load_job
from shipyard_models.allegro import load_checkpoint
from shipyard_models.allegro.md import Frame, velocity_verlet
from shipyard_models.allegro.partition import assign, wrapped_fractional


def newest_checkpoint(spec: JobSpec) -> Path:
    from shipyard.train import checkpoint as ckpt
    from shipyard.train.storage import filesystem, storage_root
    root = Path(storage_root(spec.storage.path))
    runs = sorted(root.glob(f"{spec.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in runs:
        fs, path = filesystem(str(run), spec.storage)
        found = ckpt.latest_complete(fs, path)
        if found:
            return Path(found)
    raise FileNotFoundError(f"no complete checkpoint of job {spec.name!r} under {root}; run "
                            f"`shipyard run` on the job first or pass --checkpoint")


def run_md(spec: JobSpec, checkpoint: Path, trajectory: Path | None = None, address: str | None = None) -> dict:
    from ase.build import bulk
    from ase.io import write
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.units import fs

    if spec.family != "allegro":
        raise ValueError(f"model.family: the MD stage needs an 'allegro' job, got {spec.family!r}")
    md = spec.data.md
    connect(address)
    model = load_checkpoint(checkpoint)
    atoms = bulk(spec.data.element, "fcc", cubic=True).repeat((md.supercell,) * 3)
    MaxwellBoltzmannDistribution(atoms, temperature_K=md.temperature, rng=np.random.default_rng(md.seed))
    Stationary(atoms)
    trajectory = trajectory or home() / "md" / f"{spec.name}.extxyz"
    trajectory.parent.mkdir(parents=True, exist_ok=True)
    trajectory.unlink(missing_ok=True)
    cell, numbers, grid = atoms.cell.array, atoms.numbers, tuple(md.grid)
    potential = PartitionedPotential(model, grid, num_actors=md.num_actors or None, skin=md.skin)
    owners: list[np.ndarray] = []
    ghosts: list[int] = []

    def compute(x):
        out = potential(x, numbers, cell)
        owners.append(assign(wrapped_fractional(x, cell), grid))
        ghosts.append(out["ghosts"])
        return out

    def on_frame(frame: Frame):
        if frame.step % md.write_every == 0:
            snap = atoms.copy()
            snap.positions = frame.positions
            snap.set_velocities(frame.velocities)
            snap.info.update(step=frame.step, potential_energy=frame.potential_energy,
                             total_energy=frame.total_energy)
            write(str(trajectory), snap, format="extxyz", append=True)

    start = time.perf_counter()
    try:
        frames = velocity_verlet(compute, atoms.positions, atoms.get_velocities(), atoms.get_masses(),
                                 md.dt_fs * fs, md.steps, on_frame)
    finally:
        potential.shutdown()
    seconds = time.perf_counter() - start
    e = np.array([f.total_energy for f in frames])
    return {"atoms": len(atoms), "domains": int(np.prod(grid)), "actors": potential.num_actors,
            "steps": md.steps, "dt_fs": md.dt_fs, "trajectory": str(trajectory),
            "energy_drift_per_atom": float(abs(e[-1] - e[0]) / len(atoms)),
            "energy_max_error_per_atom": float(np.abs(e - e[0]).max() / len(atoms)),
            "migrations": int(sum((a != b).sum() for a, b in zip(owners[:-1], owners[1:]))),
            "ghosts_per_owned": float(np.mean(ghosts) / len(atoms)),
            "atom_steps_per_s": len(atoms) * (md.steps + 1) / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shipyard.md", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="the Allegro job spec (its data.md block holds the MD settings)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.md.steps=100")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the job's newest local one)")
    parser.add_argument("--trajectory", help="output extxyz (default: .shipyard/md/<job name>.extxyz)")
    parser.add_argument("--address", help="an existing Ray cluster (default: a local one)")
    args = parser.parse_args(argv)
    spec = load_job(args.job, args.overrides)
    checkpoint = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(spec)
    summary = run_md(spec, checkpoint, Path(args.trajectory) if args.trajectory else None, args.address)
    print(json.dumps(summary))
    return 0
