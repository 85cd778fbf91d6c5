"""Allegro as an ASE `Calculator`: energy, per-atom energies, forces and stress for any `Atoms`,
from a model in memory or a Shipyard checkpoint directory (safetensors weights + meta.json), so
users can run ASE's MD, relaxations, phonons and so on with a trained potential.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from .model import Allegro, Config, energy_forces_virial
from .neighbors import neighbor_list


def predict(model: Allegro, positions_N3, numbers_N, cell_33, pbc_3, dtype=torch.float64) -> dict[str, np.ndarray]:
    """Energy, atom energies, forces and virial of one structure (NumPy in, NumPy out)."""
    positions = np.asarray(positions_N3, dtype=np.float64)
    edge_index, S = neighbor_list(positions, cell_33, pbc_3, model.cfg.r_max)
    cell = torch.as_tensor(np.asarray(cell_33, dtype=np.float64), dtype=dtype)
    out = energy_forces_virial(
        model, torch.as_tensor(np.asarray(numbers_N), dtype=torch.long), torch.as_tensor(positions, dtype=dtype),
        torch.from_numpy(edge_index), torch.from_numpy(S).to(dtype) @ cell,
        torch.ones(len(positions), dtype=torch.bool))
    return {"energy": float(out["energy"][0].detach()), "atom_energy": out["atom_energy"].detach().numpy(),
            "forces": out["forces"].detach().numpy(), "virial": out["virial"][0].detach().numpy()}


def load_checkpoint(directory: str | Path, dtype: torch.dtype = torch.float64) -> Allegro:
    """An `Allegro` from a Shipyard checkpoint directory: `meta.json` gives the config (the job's
    `model:` block), `model.safetensors` the weights. Nothing is unpickled."""
    from safetensors.torch import load_file
    directory = Path(directory)
    meta_path, weights_path = directory / "meta.json", directory / "model.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{directory} is not a Shipyard checkpoint: {p.name} is missing")
    meta = json.loads(meta_path.read_text())
    family = meta.get("family")
    if family != "allegro":
        raise ValueError(f"{directory} holds a {family!r} checkpoint, not an 'allegro' one")
    block = {k: v for k, v in meta["spec"]["model"].items() if k != "family"}
    known = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in block.items() if k in known})
    model = Allegro(cfg).to(dtype)  # before loading: float64 weights must not pass through float32
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()


class AllegroCalculator(Calculator):
    """ASE calculator for an `Allegro` model (float64 by default).

    `AllegroCalculator(model=m)` or `AllegroCalculator(checkpoint="path/to/checkpoint-...")`.
    Stress is in ASE's convention (eV / A^3, Voigt order) and needs a 3D-periodic cell.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model: Allegro | None = None, checkpoint: str | Path | None = None,
                 dtype: torch.dtype = torch.float64, **kwargs):
        super().__init__(**kwargs)
        if (model is None) == (checkpoint is None):
            raise ValueError("AllegroCalculator needs exactly one of model= or checkpoint=")
        self.model = load_checkpoint(checkpoint, dtype) if checkpoint is not None else model.to(dtype).eval()
        self.dtype = dtype

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        out = predict(self.model, a.positions, a.numbers, a.cell.array, a.pbc, self.dtype)
        self.results = {"energy": out["energy"], "free_energy": out["energy"],
                        "energies": out["atom_energy"], "forces": out["forces"]}
        if a.pbc.all():
            stress = -out["virial"] / a.get_volume()
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]
        elif "stress" in properties:
            raise ValueError("stress needs a cell periodic in all three directions (atoms.pbc all True)")
