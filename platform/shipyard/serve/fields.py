"""`/v1/fields`: a Universal Physics Transformer's field values at posted query points, for a
posted initial state and horizon.

Request: the state u_t as values at any points of the unit torus ("input_positions" [[x, y], ...]
in [0, 1)^2, "input_values" [u, ...] in the flow's own units), the flow's physical parameters by
name ("params", e.g. {"log10_viscosity": -3.5, "forcing": 0.1} for Navier-Stokes; /v1/models
lists the names), the query points, and a "horizon" of model timesteps. The model encodes the
state once, advances the latent "horizon" steps and decodes at the queries ("rollout": "latent",
the paper's way), or decodes and re-encodes at the input points every step ("physical").
"all_steps": true returns every step, else only the last. Supernodes are "supernodes" of the
input points chosen by "seed" (default: as many as the job trained with, at most N).

The model works in normalised units: values divided by the training fields' RMS and parameters
standardised with the training trajectories' statistics. Those statistics are not in the
checkpoint, so `prepare` recomputes them from the job's `data:` block (the generated
trajectories are cached under the platform's cache folder, so that is a one-off simulation) and
the endpoint converts both ways: requests and responses are in the flow's own units.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from .protocol import ApiError, Strict

SUMMARY = "Field values at query points after `horizon` steps from a posted state"
MAX_POINTS = 65536
MAX_HORIZON = 64


class FieldsRequest(Strict):
    """POST /v1/fields."""

    input_positions: list[list[float]] = Field(
        min_length=1, max_length=MAX_POINTS,
        description=f"1 .. {MAX_POINTS} points [x, y] of the unit torus, 0 <= x, y < 1")
    input_values: list[float] = Field(
        min_length=1, max_length=MAX_POINTS, description="the field at each input point, same order")
    params: dict[str, float] = Field(
        description="the flow's physical parameters by name (/v1/models lists them)")
    query_positions: list[list[float]] = Field(
        min_length=1, max_length=MAX_POINTS,
        description=f"1 .. {MAX_POINTS} points [x, y] to predict at, 0 <= x, y < 1")
    horizon: int = Field(1, ge=1, le=MAX_HORIZON, description=f"model timesteps ahead, 1 .. {MAX_HORIZON}")
    timestep: float = Field(0.0, ge=0.0, le=1e6, description="the model time index of the posted state, >= 0")
    rollout: Literal["latent", "physical"] = Field(
        "latent", description="'latent' (encode once) or 'physical' (re-encode every step)")
    all_steps: bool = Field(False, description="return every step's field, not only the last")
    supernodes: int | None = Field(None, ge=1, description="supernodes (<= input points); "
                                                           "default: the job's data.supernodes")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="which input points are supernodes, >= 0")
    model: str | None = Field(None, description="if given, the served model's id (/v1/models)")


def prepare(served) -> None:
    """The training normalisation (the checkpoint's own; recomputed from the job's data block only
    for a checkpoint from before the model kept it) and the parameter names."""
    from shipyard.cluster import home
    from shipyard_models.upt import normalisation, normalisation_of
    norm, source = normalisation_of(served.model), "checkpoint"
    if norm is None:  # training trajectories only, simulated here if not cached
        norm, source = normalisation(served.spec.data, home() / "data"), "recomputed from data"
    served.state["upt"] = {"norm": norm, "normalisation_source": source,
                           "param_names": served.spec.data.flow_spec("train").param_names}


def _points(rows: list[list[float]], field: str) -> torch.Tensor:
    bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
    if bad is not None:
        raise ApiError(422, f"{field}.{bad}: a point is [x, y], got {len(rows[bad])} numbers", field)
    out = torch.tensor(rows, dtype=torch.float32)
    outside = ((out < 0) | (out >= 1)).any(-1).nonzero()
    if len(outside):
        i = int(outside[0])
        raise ApiError(422, f"{field}.{i}: {rows[i]} is outside the unit torus [0, 1)^2", field)
    return out


def predict(served, req: FieldsRequest) -> dict:
    state = served.state["upt"]
    norm, names = state["norm"], state["param_names"]
    input_pos = _points(req.input_positions, "input_positions")
    query_pos = _points(req.query_positions, "query_positions")
    n = len(input_pos)
    if len(req.input_values) != n:
        raise ApiError(422, f"input_values: {len(req.input_values)} values for {n} input_positions "
                            "(one value per point)", "input_values")
    if set(req.params) != set(names):
        missing, unknown = sorted(set(names) - set(req.params)), sorted(set(req.params) - set(names))
        raise ApiError(422, "params: " + "; ".join(
            [f"missing {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(unknown)}"] * bool(unknown))
            + f" (this flow's parameters: {', '.join(names)})", "params")
    supernodes = req.supernodes or min(served.spec.data.supernodes, n)
    if supernodes > n:
        raise ApiError(422, f"supernodes: {supernodes} is more than the {n} input points", "supernodes")
    if req.timestep + req.horizon > 1e6:
        raise ApiError(422, "timestep: timestep + horizon must stay below 1e6", "timestep")
    values = torch.tensor(req.input_values, dtype=torch.float32) / norm.scale
    params = norm.params(torch.tensor([[req.params[k] for k in names]], dtype=torch.float64)).float()
    if not torch.isfinite(values).all():  # finite inputs, but a huge one over a tiny scale
        raise ApiError(422, "input_values: too large for this model's units", "input_values")
    generator = torch.Generator().manual_seed(req.seed)
    supernode_pos = input_pos[torch.randperm(n, generator=generator)[:supernodes]]
    rollout = served.model.rollout_latent if req.rollout == "latent" else served.model.rollout_physical
    with torch.no_grad():
        out = rollout(input_pos[None], values[None, :, None], supernode_pos[None],
                      torch.tensor([req.timestep]), params if params.shape[1] else None,
                      req.horizon, query_pos[None])[0, :, :, 0].double() * norm.scale
    steps = out.tolist() if req.all_steps else None
    result = {"object": "fields", "model": served.model_id, "horizon": req.horizon,
              "timestep": req.timestep + req.horizon, "rollout": req.rollout,
              "supernodes": supernodes, "values": out[-1].tolist()}
    if steps is not None:
        result["steps"] = steps
    if not all(math.isfinite(v) for v in result["values"]):
        raise ApiError(422, "the prediction is not finite for this input (values far outside "
                            "the training range?)", "input_values")
    return result


def describe(served) -> dict:
    """What /v1/models adds for a UPT: the parameter names and the normalisation in use."""
    state = served.state["upt"]
    norm = state["norm"]
    return {"params": list(state["param_names"]), "value_scale": norm.scale,
            "param_mean": list(norm.param_mean), "param_std": list(norm.param_std),
            "normalisation_source": state["normalisation_source"], "max_horizon": MAX_HORIZON}
