"""Tiny float64 Allegro models and small Cu/Ni structures shared by the Allegro tests."""
from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk

from shipyard_models.allegro.model import Allegro, Config

R_MAX = 3.2


def tiny_model(seed: int = 0, species=("Cu", "Ni"), num_layers: int = 2, r_max: float = R_MAX) -> Allegro:
    """l_max 1, few channels, float64, with non-trivial per-species scale and shift."""
    torch.manual_seed(seed)
    cfg = Config(species=list(species), r_max=r_max, l_max=1, num_layers=num_layers, num_channels=4,
                 latent_dim=16, num_bessel=6, embed_dim=8, avg_num_neighbors=12.0)
    model = Allegro(cfg).double()
    S = len(species)
    model.species_shift.copy_(torch.linspace(-3.5, -4.5, S, dtype=torch.float64))
    model.species_scale.copy_(torch.linspace(0.7, 1.3, S, dtype=torch.float64))
    return model


def cuni_supercell(seed: int = 0, repeat=(2, 2, 2), rattle: float = 0.1):
    """A rattled fcc Cu supercell with about a third of the atoms replaced by Ni."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    numbers = atoms.numbers.copy()
    numbers[rng.random(len(atoms)) < 0.35] = 28
    atoms.numbers = numbers
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms

