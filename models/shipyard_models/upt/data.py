"""Point-cloud transitions u_t -> u_{t+1} of generated flows, as fixed-size tensors.

Each item is one transition of one trajectory, seen through freshly sampled point clouds: the
inputs are u_t at N random points (exact values of the solver's Fourier series, see
`shipyard_models.data.flows.evaluate_at`), the S supernodes are S of those input points (as in
the paper), and the targets are u_{t+1} at Q other random points. Point counts are fixed per
dataset so the platform can stack items; the positions differ per item and per resampling.
Items are deterministic functions of (seed, index), so every worker and every resume sees the
same data.

Values are divided by the training fields' RMS; physical parameters are standardised with the
training trajectories' mean and standard deviation (both kept in `Normalisation`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..data.flows import evaluate_series, fourier_basis, fourier_coefficients, sample_points


@dataclass(frozen=True)
class Normalisation:
    scale: float
    """RMS of the training fields: values are divided by it."""
    param_mean: tuple[float, ...]
    param_std: tuple[float, ...]

    @classmethod
    def of(cls, fields: torch.Tensor, params: torch.Tensor) -> "Normalisation":
        std = params.double().std(dim=0, unbiased=False) if len(params) > 1 else torch.ones(params.shape[1])
        std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a fixed parameter: just centre it
        return cls(float(fields.double().pow(2).mean().sqrt()), tuple(params.double().mean(0).tolist()),
                   tuple(std.tolist()))

    def params(self, params: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.param_mean, dtype=params.dtype)
        std = torch.tensor(self.param_std, dtype=params.dtype)
        return (params - mean) / std


class FlowTransitions(Dataset):
    """Item i: transition t of trajectory b, resampling r (i = (r * B + b) * T + t) as
    {"input_pos" [N, 2], "input_values" [N, 1], "supernode_pos" [S, 2], "output_pos" [Q, 2],
    "target" [Q, 1] (u_{t+1}), "previous" [Q, 1] (u_t at the outputs: the persistence baseline),
    "timestep" [] (t), "params" [P] (standardised), and the normalisation itself, "value_scale" [],
    "param_mean" [P], "param_std" [P], which the family's loss copies into the model}.

    Args:
        fields: [B, T+1, G, G] trajectories on the grid; params: [B, P] raw physical parameters.
        norm: value scale and parameter statistics (the training set's, for train and val alike).
        input_points, output_points, supernodes: N, Q, S.
        resamplings: point clouds drawn per transition (the dataset's length multiplies by it).
        density: "uniform" or "clustered" point clouds (see `sample_points`).
        seed: the positions of item i depend only on (seed, i).
    """

    def __init__(self, fields: torch.Tensor, params: torch.Tensor, norm: Normalisation, input_points: int,
                 output_points: int, supernodes: int, resamplings: int = 1, density: str = "uniform",
                 seed: int = 0):
        if supernodes > input_points:
            raise ValueError(f"supernodes ({supernodes}) must not exceed input_points ({input_points}): "
                             "supernodes are sampled from the input points")
        if fields.shape[1] < 2:
            raise ValueError("trajectories need at least 2 snapshots to make a transition")
        self.grid = fields.shape[-1]
        self.coeffs = fourier_coefficients(fields / norm.scale)  # complex64 [B, T+1, G, G]
        self.params = norm.params(params.float()).float()
        self.norm = {"value_scale": torch.tensor(norm.scale, dtype=torch.float64),
                     "param_mean": torch.tensor(norm.param_mean, dtype=torch.float64),
                     "param_std": torch.tensor(norm.param_std, dtype=torch.float64)}
        self.n_in, self.n_out, self.n_super = input_points, output_points, supernodes
        self.resamplings, self.density, self.seed = resamplings, density, seed
        self.trajectories, self.transitions = fields.shape[0], fields.shape[1] - 1

    def __len__(self) -> int:
        return self.resamplings * self.trajectories * self.transitions

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rest, t = divmod(i, self.transitions)
        b = rest % self.trajectories
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        input_pos = sample_points(1, self.n_in, gen, self.density)[0]
        output_pos = sample_points(1, self.n_out, gen, self.density)[0]
        supernode_pos = input_pos[torch.randperm(self.n_in, generator=gen)[:self.n_super]]
        at_input, at_output = fourier_basis(input_pos, self.grid), fourier_basis(output_pos, self.grid)
        now, nxt = self.coeffs[b, t], self.coeffs[b, t + 1]
        return {
            "input_pos": input_pos,
            "input_values": evaluate_series(now, at_input)[:, None],
            "supernode_pos": supernode_pos,
            "output_pos": output_pos,
            "target": evaluate_series(nxt, at_output)[:, None],
            "previous": evaluate_series(now, at_output)[:, None],
            "timestep": torch.tensor(float(t)),
            "params": self.params[b],
            **self.norm,
        }
