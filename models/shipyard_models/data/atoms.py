"""Atomistic training data: labelled structures as extended-XYZ, and padded tensor datasets.

Users bring extended-XYZ files (energy, forces, optionally stress; what ASE writes and reads).
For tests and jobs we generate such a file with ASE's EMT calculator (Cu, Ni, Al, Pd, Ag, Pt, Au):
rattled and strained fcc supercells, supercells with a vacancy (so atom counts vary), and
snapshots of short Langevin MD trajectories. The file is cached under the platform's cache
directory (`.shipyard/cache`), keyed by the generation parameters, and written atomically.

`PaddedStructures` turns a list of structures into items of equally shaped tensors (the platform
stacks items into batches): every structure is padded to the largest atom count with a `mask`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

EMT_ELEMENTS = ("Cu", "Ni", "Al", "Pd", "Ag", "Pt", "Au")


@dataclass
class EMTRecipe:
    """How `generate_emt` builds its structures (all of it goes into the cache key)."""

    element: str = "Cu"
    n_structures: int = 96
    supercell: int = 2
    """Repeats of the 4-atom cubic fcc cell along each axis (2: 32 atoms)."""
    rattle: float = 0.1
    """Largest standard deviation (A) of the Gaussian displacements."""
    strain: float = 0.03
    """Largest magnitude of the random strain components."""
    vacancy_fraction: float = 0.25
    """Fraction of the static structures with one atom removed."""
    md_fraction: float = 0.25
    """Fraction of the structures taken from a short Langevin MD run."""
    md_temperature: float = 800.0
    """Kelvin."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.element not in EMT_ELEMENTS:
            raise ValueError(f"element: {self.element!r} has no EMT parameters; choose one of {', '.join(EMT_ELEMENTS)}")
        if self.n_structures < 2:
            raise ValueError(f"n_structures must be at least 2, got {self.n_structures}")
        if self.supercell < 1:
            raise ValueError(f"supercell must be at least 1, got {self.supercell}")
        for name in ("vacancy_fraction", "md_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")


def generate_emt(recipe: EMTRecipe) -> list:
    """Labelled structures (ASE `Atoms` with single-point EMT results), deterministic in the seed."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.units import fs

    rng = np.random.default_rng(recipe.seed)
    base = bulk(recipe.element, "fcc", cubic=True).repeat((recipe.supercell,) * 3)
    n_md = int(round(recipe.md_fraction * recipe.n_structures))
    out = []

    def labelled(atoms):
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frozen = atoms.copy()
        frozen.calc = SinglePointCalculator(frozen, energy=e, forces=f, stress=s)
        return frozen

    for _ in range(recipe.n_structures - n_md):
        atoms = base.copy()
        if rng.random() < recipe.vacancy_fraction:
            del atoms[int(rng.integers(len(atoms)))]
        eps = rng.uniform(-recipe.strain, recipe.strain, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(scale=rng.uniform(0.2, 1.0) * recipe.rattle, size=atoms.positions.shape)
        out.append(labelled(atoms))
    if n_md:
        atoms = base.copy()
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=recipe.md_temperature, rng=rng)
        dyn = Langevin(atoms, 2 * fs, temperature_K=recipe.md_temperature, friction=0.02, fixcm=False, rng=rng)
        for _ in range(n_md):
            dyn.run(5)
            out.append(labelled(atoms.copy()))
    return out


def emt_file(cache_dir: Path, recipe: EMTRecipe) -> Path:
    """The cached extxyz file for a recipe, generated (atomically) when missing."""
    from ase.io import write
    key = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "atoms" / f"emt-{recipe.element}-{key}.extxyz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write(str(tmp), generate_emt(recipe), format="extxyz")
        os.replace(tmp, path)
    return path


def read_structures(path: str | Path) -> list:
    """Every frame of an extxyz file; each must carry an energy and forces."""
    from ase.io import read
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such structure file: {path}")
    frames = read(str(path), index=":", format="extxyz")
    for k, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results or "forces" not in atoms.calc.results:
            raise ValueError(f"{path}: frame {k} has no energy and forces (extxyz needs energy= and a forces array)")
    return frames


def species_statistics(frames: list, species: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-species energy shift (least squares of total energies on composition, eV/atom) and
    scale (RMS force component on atoms of that species, eV/A; 1 where a species has none)."""
    from ase.data import atomic_numbers
    zs = [atomic_numbers[s] for s in species]
    counts = np.array([[np.sum(a.numbers == z) for z in zs] for a in frames], dtype=np.float64)
    energies = np.array([a.calc.results["energy"] for a in frames])
    shift = np.linalg.lstsq(counts, energies, rcond=None)[0]
    scale = np.ones(len(zs))
    for t, z in enumerate(zs):
        f = np.concatenate([a.calc.results["forces"][a.numbers == z] for a in frames])
        if f.size and np.sqrt(np.mean(f ** 2)) > 0:
            scale[t] = np.sqrt(np.mean(f ** 2))
    return shift, scale


class PaddedStructures(Dataset):
    """Structures as dicts of equal-shape tensors, padded to `n_max` atoms (float64).

    Keys: numbers [n] (0 = padding), positions [n, 3], mask [n], cell [3, 3], pbc [3],
    energy [], forces [n, 3], stress [3, 3] (eV/A^3, ASE's sign), has_stress [] and the
    per-species statistics `shift` [S] and `scale` [S] of the training set (the same in every
    item, so the loss can install them in the model; see the family's `loss`).
    """

    def __init__(self, frames: list, n_max: int, shift: np.ndarray, scale: np.ndarray):
        self.frames, self.n_max = frames, n_max
        self.shift = torch.as_tensor(shift, dtype=torch.float64)
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        too_big = [len(a) for a in frames if len(a) > n_max]
        if too_big:
            raise ValueError(f"structures of {max(too_big)} atoms do not fit n_max={n_max}")

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        atoms, n, N = self.frames[k], len(self.frames[k]), self.n_max
        res = atoms.calc.results

        def pad(x, shape, dtype):
            out = torch.zeros(shape, dtype=dtype)
            out[:n] = torch.as_tensor(np.asarray(x), dtype=dtype)
            return out

        stress = res.get("stress")
        full = np.zeros((3, 3)) if stress is None else _voigt_to_matrix(np.asarray(stress))
        return {
            "numbers": pad(atoms.numbers, (N,), torch.long),
            "positions": pad(atoms.positions, (N, 3), torch.float64),
            "mask": pad(np.ones(n, dtype=bool), (N,), torch.bool),
            "cell": torch.as_tensor(atoms.cell.array, dtype=torch.float64),
            "pbc": torch.as_tensor(atoms.pbc, dtype=torch.bool),
            "energy": torch.tensor(float(res["energy"]), dtype=torch.float64),
            "forces": pad(res["forces"], (N, 3), torch.float64),
            "stress": torch.as_tensor(full, dtype=torch.float64),
            "has_stress": torch.tensor(float(stress is not None and atoms.pbc.all()), dtype=torch.float64),
            "shift": self.shift,
            "scale": self.scale,
        }


def _voigt_to_matrix(s: np.ndarray) -> np.ndarray:
    if s.shape == (3, 3):
        return s
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
