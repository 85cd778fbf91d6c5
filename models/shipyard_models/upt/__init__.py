"""Universal Physics Transformers (Alkin et al., 2024, arXiv:2402.12365) as a Shipyard family:
a latent neural operator for 2D transient flows generated here (a pseudo-spectral
Navier-Stokes solver, or exact advection-diffusion; `shipyard_models.data.flows`), trained on
irregular point clouds of any density and queried anywhere.

The platform calls only `FAMILY`; see `shipyard_models.family.Family` for the contract.
`model.py` lists what is implemented and every deviation from the paper; `data.py` the items.

Deviations of the family seam, and why:
* `loss` may only call `model(batch)` (the model may be wrapped by DDP/FSDP), so the forward
  returns every output the objective needs; the loss weights are read from the model's config.
* The trajectories are simulated once per data configuration and cached as safetensors in the
  platform's cache folder (`.shipyard/data`); validation trajectories are separate simulations
  (seed + 1) with their own parameters, normalised with the training statistics.
* Those statistics ride along in every sample and the loss copies them into the model's
  `value_scale` / `param_mean` / `param_std` buffers (as Matformer does with its target
  statistics), so a checkpoint carries its own units and serving never re-simulates the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.flows import FlowSpec, load_trajectories
from ..family import Batch, Family, Metrics
from .data import FlowTransitions, Normalisation
from .model import UPT, Config

__all__ = ["FAMILY", "Config", "DataConfig", "UPT", "FlowTransitions", "Normalisation", "build",
           "datasets", "load_flows", "normalisation", "normalisation_of", "relative_l2"]


@dataclass
class DataConfig:
    """The job spec's `data:` block: which flows to generate, and how to sample point clouds."""

    kind: Literal["navier-stokes", "advection-diffusion"] = "navier-stokes"
    """The generator: the pseudo-spectral Navier-Stokes solver, or exact advection-diffusion."""
    grid: int = 32
    """Solver grid G (G x G); the fields are band-limited below G/3."""
    train_trajectories: int = 32
    """Trajectories simulated for training (each with its own parameters)."""
    val_trajectories: int = 8
    """Trajectories simulated for validation (a different seed)."""
    snapshots: int = 20
    """Transitions per trajectory (snapshots + 1 fields)."""
    every: float = 1.0
    """Time between snapshots (one model timestep)."""
    dt: float = 0.05
    """Solver time step (every / dt must be a whole number)."""
    max_mode: int = 4
    """Initial fields hold integer frequencies |m| <= max_mode per axis."""
    nu_min: float = 1.0e-4
    """Smallest viscosity (navier-stokes) or diffusivity (advection-diffusion), log-uniform."""
    nu_max: float = 1.0e-3
    """Largest viscosity / diffusivity."""
    forcing_min: float = 0.0
    """Smallest forcing amplitude (navier-stokes)."""
    forcing_max: float = 0.2
    """Largest forcing amplitude (navier-stokes)."""
    speed_min: float = 0.05
    """Smallest advection speed (advection-diffusion)."""
    speed_max: float = 0.15
    """Largest advection speed (advection-diffusion)."""
    input_points: int = 1024
    """N, input points per sample."""
    output_points: int = 512
    """Q, query points per sample."""
    supernodes: int = 128
    """S, supernodes per sample (sampled from the input points)."""
    resamplings: int = 4
    """Point clouds drawn per training transition (validation uses one)."""
    density: Literal["uniform", "clustered"] = "uniform"
    """How the points are spread over the domain."""
    seed: int = 0
    """Seed of the training trajectories (validation: seed + 1) and of the point clouds."""

    def __post_init__(self) -> None:
        for name in ("grid", "train_trajectories", "val_trajectories", "snapshots", "max_mode",
                     "input_points", "output_points", "supernodes", "resamplings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.supernodes > self.input_points:
            raise ValueError(f"supernodes ({self.supernodes}) must not exceed input_points "
                             f"({self.input_points})")
        self.flow_spec("train")  # FlowSpec checks the solver fields

    @property
    def n_params(self) -> int:
        return 2 if self.kind == "navier-stokes" else 3

    def flow_spec(self, split: str) -> FlowSpec:
        return FlowSpec(kind=self.kind, grid=self.grid,
                        trajectories=self.train_trajectories if split == "train" else self.val_trajectories,
                        snapshots=self.snapshots, every=self.every, dt=self.dt, max_mode=self.max_mode,
                        nu_min=self.nu_min, nu_max=self.nu_max, forcing_min=self.forcing_min,
                        forcing_max=self.forcing_max, speed_min=self.speed_min, speed_max=self.speed_max,
                        seed=self.seed if split == "train" else self.seed + 1)


def build(cfg: Config) -> nn.Module:
    return UPT(cfg)


def load_flows(data_cfg: DataConfig, cache_dir: Path):
    """(train, val) raw trajectories {"fields", "params"} and the training normalisation."""
    train = load_trajectories(data_cfg.flow_spec("train"), cache_dir)
    val = load_trajectories(data_cfg.flow_spec("val"), cache_dir)
    return train, val, Normalisation.of(train["fields"], train["params"])


def normalisation(data_cfg: DataConfig, cache_dir: Path) -> Normalisation:
    """The training normalisation recomputed from the data (no validation trajectories); serving
    needs it only for a checkpoint that does not carry it (`normalisation_of`)."""
    train = load_trajectories(data_cfg.flow_spec("train"), cache_dir)
    return Normalisation.of(train["fields"], train["params"])


def normalisation_of(model: UPT) -> Normalisation | None:
    """The training normalisation a trained model keeps in its buffers, or None for a model that
    never saw a batch (or a checkpoint from before the buffers existed)."""
    stats = [getattr(model, name).double() for name in UPT.NORMALISATION]
    if any(bool(t.isnan().any()) for t in stats):
        return None
    return Normalisation(float(stats[0]), tuple(stats[1].tolist()), tuple(stats[2].tolist()))


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    if cfg.n_params != data_cfg.n_params:
        raise ValueError(f"model.n_params is {cfg.n_params} but data.kind {data_cfg.kind!r} has "
                         f"{data_cfg.n_params} physical parameters; set model.n_params: {data_cfg.n_params}")
    if cfg.channels != 1:
        raise ValueError(f"model.channels must be 1 for the scalar flows (vorticity or concentration), "
                         f"got {cfg.channels}")
    train, val, norm = load_flows(data_cfg, cache_dir)
    common = dict(norm=norm, input_points=data_cfg.input_points, output_points=data_cfg.output_points,
                  supernodes=data_cfg.supernodes, density=data_cfg.density)
    return (FlowTransitions(train["fields"], train["params"], resamplings=data_cfg.resamplings,
                            seed=data_cfg.seed, **common),
            FlowTransitions(val["fields"], val["params"], resamplings=1, seed=data_cfg.seed + 1, **common))


def relative_l2(pred_BQC: torch.Tensor, target_BQC: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||pred - target|| / ||target|| (over points and channels)."""
    err = (pred_BQC - target_BQC).flatten(1).norm(dim=1)
    return (err / target_BQC.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()


def _objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    core = getattr(model, "module", model)  # DDP / DeepSpeed wrap the UPT
    cfg: Config = core.cfg
    with torch.no_grad():  # the training normalisation travels with the data; keep it in the weights
        for name in UPT.NORMALISATION:
            if name in batch:  # the family's items carry it; a hand-built batch may not
                getattr(core, name).copy_(batch[name][0])
    out = model(batch)
    mse = F.mse_loss(out["prediction"], batch["target"])
    loss = mse
    metrics = {"mse": mse.detach(),
               "rel_l2": relative_l2(out["prediction"].detach(), batch["target"]),
               "persistence_rel_l2": relative_l2(batch["previous"], batch["target"])}
    if "reconstruction" in out:
        inv_enc = F.mse_loss(out["reconstruction"], batch["input_values"])
        loss = loss + cfg.inverse_encoding_weight * inv_enc
        metrics["inverse_encoding"] = inv_enc.detach()
    if "reencoded" in out:
        inv_dec = F.mse_loss(out["reencoded"], out["predicted_latent"])
        loss = loss + cfg.inverse_decoding_weight * inv_dec
        metrics["inverse_decoding"] = inv_dec.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    """MSE of the one-step prediction at the query points, plus the weighted inverse-encoding and
    inverse-decoding losses when switched on; no step-dependent curriculum."""
    return _objective(model, batch)


def evaluate(model: nn.Module, batch: Batch) -> Metrics:
    return _objective(model, batch)[1]


def shard_units(model: nn.Module) -> list[nn.Module]:
    return [*model.encoder.blocks, *model.approximator.blocks, *model.decoder.blocks]


FAMILY = Family(
    name="upt",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=evaluate,
    shard_units=shard_units,
)
