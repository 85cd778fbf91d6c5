"""A partitioned Allegro potential on Ray actors.

The driver decomposes the box (owned atoms + ghosts within r_max + skin per domain), sends each
domain to its actor, and sums what comes back: owned atoms' energies, the partial forces on every
local atom (ghost forces go back to their owners), and the domains' virials. With as many actors
as domains this is one actor per domain; with fewer, actor `a` evaluates domains a, a + A, ...
"""
from __future__ import annotations

import math

import numpy as np
import ray
import torch

from shipyard_models.allegro.model import Allegro, Config
from shipyard_models.allegro.partition import Domain, decompose, evaluate_domain, gather


@ray.remote(num_cpus=1)
class DomainWorker:
    """Holds one copy of the model and evaluates the domains it is handed."""

    def __init__(self, cfg: dict, state: dict[str, np.ndarray], dtype: str = "float64", threads: int = 1):
        torch.set_num_threads(threads)
        self.dtype = getattr(torch, dtype)
        self.model = Allegro(Config(**cfg)).to(self.dtype)
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.model.eval()

    def evaluate(self, domains: list[Domain]) -> list[dict[str, np.ndarray]]:
        return [evaluate_domain(self.model, d, self.dtype) for d in domains]


class PartitionedPotential:
    """Energy, atom energies, forces and virial of a periodic box, domain by domain on actors.

    Args:
        model: the trained `Allegro` (its config and weights are shipped to every actor).
        grid: domains per axis (gx, gy, gz), in fractional coordinates of the cell; `set_grid`
            changes it between calls (the actors stay).
        num_actors: actors to start; default one per domain.
        skin: extra ghost margin beyond r_max (A).
    """

    def __init__(self, model: Allegro, grid: tuple[int, int, int], num_actors: int | None = None,
                 skin: float = 0.0, dtype: str = "float64"):
        from dataclasses import fields
        self.skin, self.r_max = skin, model.cfg.r_max
        self.num_actors = num_actors or math.prod(grid)
        self.set_grid(grid)
        cfg = {f.name: getattr(model.cfg, f.name) for f in fields(Config)}
        state = ray.put({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        self.actors = [DomainWorker.remote(cfg, state, dtype) for _ in range(self.num_actors)]
        self.last_domains: list[Domain] = []

    def set_grid(self, grid) -> None:
        n_domains = math.prod(grid)
        if not 1 <= self.num_actors <= n_domains:
            raise ValueError(f"num_actors must be within 1..{n_domains} (the domains of grid {tuple(grid)}), "
                             f"got {self.num_actors}")
        self.grid = tuple(grid)

    def __call__(self, positions_N3, numbers_N, cell_33, pbc_3=(True, True, True)) -> dict:
        domains = decompose(positions_N3, numbers_N, cell_33, pbc_3, self.grid, self.r_max, self.skin)
        futures = [actor.evaluate.remote(domains[a::self.num_actors]) for a, actor in enumerate(self.actors)]
        per_actor = ray.get(futures)
        results: list = [None] * len(domains)
        for a, res in enumerate(per_actor):
            results[a::self.num_actors] = res
        self.last_domains = domains
        out = gather(domains, results, len(positions_N3))
        out["ghosts"] = sum(d.n_ghosts for d in domains)
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
