"""Velocity-Verlet NVE dynamics over any force provider (plain NumPy, ASE units).

`compute(positions) -> {"energy", "forces", ...}` may be the single-domain model
(`calculator.predict`), the in-process partition (`partition.predict_partitioned`) or the Ray
actors of `shipyard.md`; the integrator does not care, which is what lets a test compare their
trajectories step by step. Atoms leave their domain as they move: the partition is rebuilt from
the new positions at every force call, so migration needs no bookkeeping here.
Units: A, eV, amu; `dt` in ASE time units (dt_fs * ase.units.fs); velocities in A per ASE time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Frame:
    step: int
    positions: np.ndarray
    velocities: np.ndarray
    forces: np.ndarray
    potential_energy: float
    kinetic_energy: float

    @property
    def total_energy(self) -> float:
        return self.potential_energy + self.kinetic_energy


def velocity_verlet(compute: Callable[[np.ndarray], dict], positions_N3: np.ndarray, velocities_N3: np.ndarray,
                    masses_N: np.ndarray, dt: float, steps: int,
                    on_frame: Callable[[Frame], None] | None = None) -> list[Frame]:
    """Integrate `steps` steps; returns the frames 0..steps (positions unwrapped)."""
    x = np.array(positions_N3, dtype=np.float64)
    v = np.array(velocities_N3, dtype=np.float64)
    m = np.asarray(masses_N, dtype=np.float64)[:, None]
    out = compute(x)
    frames = [_frame(0, x, v, out, m)]
    if on_frame:
        on_frame(frames[-1])
    for step in range(1, steps + 1):
        v = v + 0.5 * dt * out["forces"] / m
        x = x + dt * v
        out = compute(x)
        v = v + 0.5 * dt * out["forces"] / m
        frames.append(_frame(step, x, v, out, m))
        if on_frame:
            on_frame(frames[-1])
    return frames


def _frame(step, x, v, out, m) -> Frame:
    return Frame(step=step, positions=x.copy(), velocities=v.copy(), forces=np.array(out["forces"]),
                 potential_energy=float(out["energy"]), kinetic_energy=float(0.5 * (m * v * v).sum()))
