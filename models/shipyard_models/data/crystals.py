"""Crystals with a scalar target per structure: generated with EMT labels, or read from files.

Generated set (`generate`): ASE bulk fcc, bcc and hcp cells of the EMT metals (Al, Cu, Ag, Au, Ni,
Pd, Pt) and random binary alloy supercells of them, each strained (a random symmetric strain) and
rattled (Gaussian displacements), labelled with ASE's EMT potential:
  * `energy_per_atom` (eV/atom), the EMT energy divided by the number of atoms;
  * `formation_energy_per_atom` (eV/atom), that minus the composition-weighted EMT energy per atom
    of each element's fcc crystal at ASE's reference lattice constant.
Lattice constants: the element's fcc reference constant (Vegard's law for alloys), converted to
bcc / hcp at the same volume per atom (ideal c/a). Everything follows from the seed.

User data (`read`): a folder of CIF / POSCAR / extxyz files, or one extxyz holding many frames.
Targets come from each frame's `info[target_key]` (extxyz `key=value` comments) or, for a folder,
from a `targets.csv` with lines `file_name,target` (a header line is allowed). ASE does the
parsing; nothing is unpickled.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.data import atomic_numbers, reference_states

EMT_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
TARGETS = ("formation_energy_per_atom", "energy_per_atom")
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz")


def fcc_constant(symbol: str) -> float:
    state = reference_states[atomic_numbers[symbol]]
    if state is None or state.get("symmetry") != "fcc":
        raise ValueError(f"elements must be fcc metals with an ASE reference lattice constant "
                         f"(e.g. {', '.join(EMT_METALS)}), got {symbol!r}")
    return float(state["a"])


def _cell(kind: str, symbol: str, a_fcc: float, cubic: bool) -> Atoms:
    """One cell of `kind` at the fcc volume per atom."""
    if kind == "fcc":
        return bulk(symbol, "fcc", a=a_fcc, cubic=cubic)
    if kind == "bcc":
        return bulk(symbol, "bcc", a=a_fcc * 2 ** (-1 / 3), cubic=cubic)
    a = a_fcc / np.sqrt(2)
    return bulk(symbol, "hcp", a=a, c=a * np.sqrt(8 / 3))


def reference_energies(elements) -> dict[str, float]:
    """EMT energy per atom of each element's fcc crystal at ASE's reference lattice constant."""
    out = {}
    for symbol in elements:
        atoms = bulk(symbol, "fcc", a=fcc_constant(symbol))
        atoms.calc = EMT()
        out[symbol] = float(atoms.get_potential_energy()) / len(atoms)
    return out


def generate(num: int, seed: int = 0, elements=EMT_METALS, max_atoms: int = 16,
             alloy_fraction: float = 0.6, strain: float = 0.03, rattle: float = 0.05) -> list[Atoms]:
    """`num` labelled crystals (targets in `atoms.info`), deterministic in `seed`."""
    if num < 1:
        raise ValueError(f"num_structures must be >= 1, got {num}")
    if len(elements) < 2:
        raise ValueError(f"elements needs at least two symbols for alloys, got {list(elements)}")
    if max_atoms < 4:
        raise ValueError(f"max_atoms must be >= 4, got {max_atoms}")
    refs = reference_energies(elements)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < num:
        kind = ("fcc", "bcc", "hcp")[rng.integers(3)]
        if rng.random() < alloy_fraction:
            pair = rng.choice(len(elements), size=2, replace=False)
            a_sym, b_sym = elements[pair[0]], elements[pair[1]]
            atoms = _cell(kind, a_sym, 1.0, cubic=True)
            reps = rng.integers(1, 3, size=3)
            if len(atoms) * int(np.prod(reps)) > max_atoms:
                continue
            atoms = atoms.repeat(tuple(int(r) for r in reps))
            is_b = rng.random(len(atoms)) < rng.uniform(0.1, 0.9)
            if is_b.all() or not is_b.any():
                continue
            x_b = is_b.mean()
            a_fcc = (1 - x_b) * fcc_constant(a_sym) + x_b * fcc_constant(b_sym)
            atoms = _cell(kind, a_sym, a_fcc, cubic=True).repeat(tuple(int(r) for r in reps))
            atoms.numbers[is_b] = atomic_numbers[b_sym]
        else:
            symbol = elements[rng.integers(len(elements))]
            atoms = _cell(kind, symbol, fcc_constant(symbol), cubic=bool(rng.random() < 0.3))
        eps = rng.normal(0.0, strain, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
        atoms.wrap()
        atoms.calc = EMT()
        energy = float(atoms.get_potential_energy()) / len(atoms)
        atoms.calc = None
        symbols = atoms.get_chemical_symbols()
        reference = sum(refs[s] for s in symbols) / len(atoms)
        atoms.info.update(energy_per_atom=energy, formation_energy_per_atom=energy - reference)
        out.append(atoms)
    return out


def target_of(atoms: Atoms, key: str, where: str) -> float:
    if key in atoms.info:
        return float(atoms.info[key])
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    if key == "energy" and "energy" in results:
        return float(results["energy"])
    if key == "energy_per_atom" and "energy" in results:
        return float(results["energy"]) / len(atoms)
    raise ValueError(f"{where}: no target {key!r} (data.target_key); info keys: {sorted(atoms.info)}")


def read(path: str | Path, target_key: str) -> tuple[list[Atoms], np.ndarray]:
    """Structures and their targets from a folder or one extxyz file (see the module docstring)."""
    from ase.io import read as ase_read

    path = Path(path)
    if not path.exists():
        raise ValueError(f"data.source: {path} does not exist")
    if path.is_file():
        frames = ase_read(path, index=":")
        return frames, np.array([target_of(a, target_key, f"{path}[{i}]")
                                 for i, a in enumerate(frames)])
    table = {}
    csv_path = path / "targets.csv"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2:
                    continue
                try:
                    table[row[0].strip()] = float(row[1])
                except ValueError:
                    if table:
                        raise ValueError(f"{csv_path}: bad target in row {row}") from None
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix.lower() in STRUCTURE_SUFFIXES or p.name.upper().startswith(("POSCAR", "CONTCAR"))))
    if not files:
        raise ValueError(f"data.source: no CIF/POSCAR/extxyz files in {path}")
    structures, targets = [], []
    for file in files:
        fmt = "vasp" if file.name.upper().startswith(("POSCAR", "CONTCAR")) else None
        for i, atoms in enumerate(ase_read(file, index=":", format=fmt)):
            structures.append(atoms)
            if file.name in table:
                targets.append(table[file.name])
            else:
                targets.append(target_of(atoms, target_key, f"{file}[{i}] (and not in targets.csv)"))
    return structures, np.array(targets)
