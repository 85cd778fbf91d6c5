"""Allegro ("Learning Local Equivariant Representations for Large-Scale Atomistic Dynamics",
Musaelian et al., 2023) as a Shipyard family: a strictly local equivariant interatomic potential
trained on energies, forces and stresses from extended-XYZ files (generated here with ASE's EMT).

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`model.py` lists what is implemented and every deviation from the paper; `recipe.py` the loss;
`calculator.py` the ASE calculator; `partition.py` the spatial decomposition into domains;
`md.py` velocity Verlet over any force provider. The platform's `shipyard.md` runs the domains
on Ray actors (`data.md` holds that stage's settings).

Batches: structures are padded to the largest atom count in the data with a `mask` (see
`shipyard_models.data.atoms.PaddedStructures`), so variable atom counts batch like anything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from torch import nn

from ..data.atoms import EMTRecipe, PaddedStructures, emt_file, read_structures, species_statistics
from ..family import Batch, Family
from . import recipe
from .calculator import AllegroCalculator, load_checkpoint, predict
from .model import Allegro, Config, energy_forces_virial

__all__ = ["FAMILY", "Config", "DataConfig", "MDConfig", "Allegro", "AllegroCalculator", "energy_forces_virial",
           "load_checkpoint", "predict"]


@dataclass
class MDConfig:
    """The partitioned NVE MD stage (`python -m shipyard.md JOB`): an fcc supercell of
    `data.element`, velocities at `temperature`, velocity Verlet across one Ray actor per domain."""

    supercell: int = 4
    """Repeats of the 4-atom cubic cell per axis (4: 256 atoms)."""
    temperature: float = 300.0
    """Initial Maxwell-Boltzmann temperature (K)."""
    dt_fs: float = 2.0
    steps: int = 20
    grid: list[int] = field(default_factory=lambda: [2, 1, 1])
    """Domains per axis."""
    num_actors: int = 0
    """Ray actors; 0 = one per domain."""
    skin: float = 0.5
    """Ghost margin beyond r_max (A)."""
    write_every: int = 5
    """Trajectory frames are written every N steps (extxyz)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"md.grid must be three positive domain counts, got {self.grid}")
        for name in ("supercell", "steps", "write_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"md.{name} must be at least 1, got {getattr(self, name)}")
        if self.dt_fs <= 0 or self.skin < 0 or self.num_actors < 0:
            raise ValueError("md.dt_fs must be positive, md.skin and md.num_actors at least 0")


@dataclass
class DataConfig:
    """The job spec's `data:` block: an extxyz file, or EMT-generated structures."""

    path: str = ""
    """An extended-XYZ file with energies and forces (and stress); "" = generate with EMT below."""
    element: str = "Cu"
    """EMT: the fcc metal (Cu, Ni, Al, Pd, Ag, Pt, Au)."""
    n_structures: int = 96
    """EMT: structures to generate (rattled/strained/vacancy supercells and MD snapshots)."""
    supercell: int = 2
    """EMT: repeats of the 4-atom cubic cell per axis."""
    rattle: float = 0.1
    strain: float = 0.03
    md_fraction: float = 0.25
    md_temperature: float = 800.0
    val_fraction: float = 0.2
    """The last part of the (shuffled) structures held out for validation."""
    seed: int = 0
    md: MDConfig = field(default_factory=MDConfig)
    """Settings of the partitioned MD stage (used by `python -m shipyard.md`, not by training)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be within (0, 1), got {self.val_fraction}")

    def recipe(self) -> EMTRecipe:
        keys = {f.name for f in fields(EMTRecipe)}
        return EMTRecipe(**{k: getattr(self, k) for k in keys if hasattr(self, k)})


@dataclass
class TrainConfig(Config):
    """The `model:` block: the model's hyperparameters plus the loss weights."""

    energy_weight: float = 1.0
    """Weight of the squared per-atom energy error (eV^2)."""
    force_weight: float = 1.0
    """Weight of the squared force-component error (eV^2/A^2)."""
    stress_weight: float = 0.0
    """Weight of the squared stress-component error (eV^2/A^6); only structures with stress."""


def build(cfg: Config) -> nn.Module:
    return Allegro(cfg)  # a TrainConfig is a Config; the model keeps it for the loss weights


def datasets(cfg: TrainConfig, data_cfg: DataConfig, cache_dir: Path):
    if data_cfg.path:
        frames = read_structures(data_cfg.path)
    else:
        recipe_ = data_cfg.recipe()
        if recipe_.element not in cfg.species:
            raise ValueError(f"data.element {recipe_.element!r} is not in model.species {cfg.species}")
        frames = read_structures(emt_file(Path(cache_dir), recipe_))
    import numpy as np
    order = np.random.default_rng(data_cfg.seed).permutation(len(frames))
    n_val = max(1, int(round(data_cfg.val_fraction * len(frames))))
    train = [frames[i] for i in order[:-n_val]]
    val = [frames[i] for i in order[-n_val:]]
    shift, scale = species_statistics(train, cfg.species)
    n_max = max(len(a) for a in frames)
    return PaddedStructures(train, n_max, shift, scale), PaddedStructures(val, n_max, shift, scale)


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    cfg = recipe.unwrap(model).cfg
    weights = (getattr(cfg, "energy_weight", 1.0), getattr(cfg, "force_weight", 1.0), getattr(cfg, "stress_weight", 0.0))
    return recipe.loss(model, batch, weights)


def shard_units(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


FAMILY = Family(
    name="allegro",
    Config=TrainConfig,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=recipe.evaluate,
    shard_units=shard_units,
)
