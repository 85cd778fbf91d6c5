"""A partitioned Allegro potential on Ray actors.

The driver decomposes the box (owned atoms + ghosts within r_max + skin per domain), sends each
domain to its actor, and sums what comes back: owned atoms' energies, the partial forces on every
local atom (ghost forces go back to their owners), and the domains' virials. With as many actors
as domains this is one actor per domain; with fewer, actor `a` evaluates domains a, a + A, ...

Every wait on the actors has a deadline (`timeout_s`): the constructor waits until every actor
has started (an actor the cluster cannot place, e.g. more actors than free CPUs, would otherwise
leave the first force call blocked for ever), and each force call waits at most `timeout_s` for
its domains; both raise `TimeoutError` saying what is missing.
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

    def ready(self) -> bool:
        return True

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
        timeout_s: the longest wait for the actors to start, and for one force call.
    """

    def __init__(self, model: Allegro, grid: tuple[int, int, int], num_actors: int | None = None,
                 skin: float = 0.0, dtype: str = "float64", timeout_s: float = 600.0):
        from dataclasses import fields
        self.skin, self.r_max = skin, model.cfg.r_max
        self.num_actors = num_actors or math.prod(grid)
        self.set_grid(grid)
        cfg = {f.name: getattr(model.cfg, f.name) for f in fields(Config)}
        state = ray.put({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        self.timeout_s = timeout_s
        self.actors = [DomainWorker.remote(cfg, state, dtype) for _ in range(self.num_actors)]
        self.last_domains: list[Domain] = []
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources().get("CPU", 0)
            self.shutdown()
            raise TimeoutError(f"{self.num_actors} domain actors (1 CPU each) did not all start within {timeout_s} s; "
                               f"the cluster has {free:g} CPUs free: use fewer actors (num_actors) or a larger "
                               f"cluster") from None

    def set_grid(self, grid) -> None:
        n_domains = math.prod(grid)
        if not 1 <= self.num_actors <= n_domains:
            raise ValueError(f"num_actors must be within 1..{n_domains} (the domains of grid {tuple(grid)}), "
                             f"got {self.num_actors}")
        self.grid = tuple(grid)

    def __call__(self, positions_N3, numbers_N, cell_33, pbc_3=(True, True, True)) -> dict:
        domains = decompose(positions_N3, numbers_N, cell_33, pbc_3, self.grid, self.r_max, self.skin)
        futures = [actor.evaluate.remote(domains[a::self.num_actors]) for a, actor in enumerate(self.actors)]
        try:
            per_actor = ray.get(futures, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            done, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
            late = [a for a, f in enumerate(futures) if f not in done]
            raise TimeoutError(f"domain actors {late} did not return their {len(domains)} domains' forces within "
                               f"{self.timeout_s} s") from None
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
