"""Allegro scaling: O(N) energy+forces, ghosts vs domain width, 1 vs 2 Ray actors, and the
model-free partitioner at cluster scale.

Claims (Musaelian et al., 2023): a strictly local model costs O(N) (time per atom flat in N), and
a box split into domains needs only a ghost shell of width r_max around each, so the work and the
messages per domain scale with its volume and surface, not with the system.

Measured here, all in one run (untrained model with the `jobs/allegro/emt-cu.yaml` sizes, float32,
neighbour list included; fcc Cu supercells with thermal-sized displacements):
* `time_per_atom_ratio_largest_vs_smallest`: energy+forces seconds per atom at the largest N over
  the smallest (1.0 = perfectly O(N)); the table lists atom-steps/s for every N.
* `partition_max_force_error`: max |F_partitioned - F_single| / max |F_single| (float64, 2x2x2
  domains): the partition is exact up to summation order.
* `ghost_over_owned_at_width_<w>`: ghost images per owned atom for cubic domains w * r_max wide.
* `weak_scaling_efficiency_2_actors`: t(1 actor, N) / t(2 actors, 2N); `strong_speedup_2_actors`:
  t(1 actor, N) / t(2 actors, N). On a shared 2-core machine these bound what to expect, no more.
* partitioner alone (`shipyard_models.allegro.partition.ghost_pairs`, no model): 10^7 atoms in
  10^3 domains (quick: 10^6 in 10^3), seconds, peak memory, ghosts per atom, the bytes sent per
  MD step (ghost positions out, ghost forces back) and migrations per step for 8..1000 domains.
* `throughput_ratio_vs_reference`: null: the reference `nequip-allegro` is not installed here.

Usage: python benchmarks/allegro_scaling.py [--quick]  ->  benchmarks/results/allegro_scaling.json
       python benchmarks/allegro_scaling.py --partitioner-only  ->  benchmarks/results/allegro_partitioner.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import shipyard_models  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path[:0] = [str(ROOT / "models"), str(ROOT / "platform")]

from ase.build import bulk  # noqa: E402

from shipyard_models.allegro.calculator import predict  # noqa: E402
from shipyard_models.allegro.model import Allegro, Config  # noqa: E402
from shipyard_models.allegro.partition import ghost_pairs, plane_spacings, predict_partitioned  # noqa: E402

CFG = Config(species=["Cu"], r_max=4.5, l_max=1, num_layers=2, num_channels=8, latent_dim=32, num_bessel=8,
             avg_num_neighbors=40.0)
CU_DENSITY = 4 / 3.61 ** 3  # atoms per A^3


def supercell(n: int, seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    atoms.positions += np.random.default_rng(seed).normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def throughput(model, sizes, repeats) -> list[dict]:
    rows = []
    for n in sizes:
        atoms = supercell(n)
        args = (atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, torch.float32)
        predict(model, *args)  # warm-up
        t = best_time(lambda: predict(model, *args), repeats)
        rows.append({"atoms": len(atoms), "seconds": t, "atom_steps_per_s": len(atoms) / t,
                     "us_per_atom": 1e6 * t / len(atoms)})
        print(f"  {len(atoms):7d} atoms  {t:8.3f} s  {len(atoms) / t:10.0f} atom-steps/s  {1e6 * t / len(atoms):8.1f} us/atom")
    return rows


def partition_error(model64) -> float:
    atoms = supercell(5, seed=1)
    want = predict(model64, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc)
    got = predict_partitioned(model64, atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, (2, 2, 2), 0.5)
    return float(np.abs(got["forces"] - want["forces"]).max() / np.abs(want["forces"]).max())


def ghost_ratios(widths) -> dict[str, float]:
    out = {}
    for w in widths:  # 3 x 3 x 3 cubic domains, each w * r_max wide
        side = 3 * w * CFG.r_max
        n = int(CU_DENSITY * side ** 3)
        frac = np.random.default_rng(0).random((n, 3))
        cell = np.eye(3) * side
        _, dom, _ = ghost_pairs(frac, (3, 3, 3), np.full(3, CFG.r_max) / plane_spacings(cell))
        out[f"ghost_over_owned_at_width_{w:g}"] = len(dom) / n
        print(f"  domain width {w:g} r_max: {len(dom) / n:.2f} ghosts per owned atom ({n} atoms)")
    return out


def actors(model, n_cells: int, repeats: int) -> dict[str, float]:
    import ray

    from shipyard.md.actors import PartitionedPotential
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        small, big = supercell(n_cells), supercell(n_cells).repeat((2, 1, 1))
        call = lambda pot, a: pot(a.positions, a.numbers, a.cell.array)  # noqa: E731
        one = PartitionedPotential(model, (1, 1, 1), num_actors=1, dtype="float32")
        call(one, small)
        t1 = best_time(lambda: call(one, small), repeats)
        one.shutdown()  # its CPU goes to the 2-actor run (2 logical CPUs in all)
        two = PartitionedPotential(model, (2, 1, 1), num_actors=2, dtype="float32")
        call(two, small)
        call(two, big)
        t2_same = best_time(lambda: call(two, small), repeats)
        t2_double = best_time(lambda: call(two, big), repeats)
        two.shutdown()
    finally:
        ray.shutdown()
    print(f"  1 actor {len(small)} atoms {t1:.3f} s; 2 actors {len(small)} atoms {t2_same:.3f} s, "
          f"{len(big)} atoms {t2_double:.3f} s")
    return {"weak_scaling_efficiency_2_actors": t1 / t2_double, "strong_speedup_2_actors": t1 / t2_same,
            "actors_atoms_per_actor": len(small)}


def partitioner_at_scale(n_atoms: int, domain_counts) -> dict[str, float]:
    side = (n_atoms / CU_DENSITY) ** (1 / 3)
    cell = np.eye(3) * side
    rng = np.random.default_rng(0)
    frac = rng.random((n_atoms, 3))
    pad = np.full(3, CFG.r_max + 0.5) / plane_spacings(cell)  # r_max + skin
    out = {}
    for k in domain_counts:
        g = round(k ** (1 / 3))
        t = time.perf_counter()
        owner, dom, _ = ghost_pairs(frac, (g, g, g), pad)
        seconds = time.perf_counter() - t
        moved = (frac + rng.normal(scale=0.02 / side, size=frac.shape)) % 1.0  # one MD step, ~0.02 A
        g3 = np.array([g, g, g])
        c = np.minimum((moved * g3).astype(np.int64), g3 - 1)
        migrations = int(((c[:, 0] * g + c[:, 1]) * g + c[:, 2] != owner).sum())
        ghosts = len(dom)
        # per step: ghost positions + ids out (3 x 8 + 8 bytes), ghost forces back (3 x 8 bytes)
        mbytes = ghosts * (32 + 24) / 1e6
        out[f"partition_{g ** 3}_domains"] = {"seconds": seconds, "ghosts_per_atom": ghosts / n_atoms,
                                              "mbytes_per_step": mbytes, "migrations_per_step": migrations}
        print(f"  {n_atoms:.0e} atoms, {g ** 3:5d} domains: {seconds:6.2f} s, {ghosts / n_atoms:.3f} ghosts/atom, "
              f"{mbytes:8.1f} MB/step, {migrations} migrations/step")
        del owner, dom
    out["partition_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 cores)")
    parser.add_argument("--partitioner-only", action="store_true",
                        help="only the model-free partitioner at 10^7 atoms -> results/allegro_partitioner.json")
    args = parser.parse_args()
    if args.partitioner_only:
        result = {"quick": False, "cores": os.cpu_count(), **partitioner_at_scale(10 ** 7, [8, 64, 216, 1000])}
        (ROOT / "benchmarks" / "results" / "allegro_partitioner.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Allegro(CFG).float().eval()
    model64 = Allegro(CFG).double().eval()
    model64.load_state_dict(model.state_dict())
    sizes = [3, 5, 8] if args.quick else [3, 5, 8, 12, 17]  # 108 .. 19652 atoms
    print("energy + forces throughput (1 thread, float32):")
    rows = throughput(model, sizes, 2 if args.quick else 3)
    result: dict = {"quick": args.quick, "cores": os.cpu_count(), "throughput": rows,
                    "time_per_atom_ratio_largest_vs_smallest": rows[-1]["us_per_atom"] / rows[0]["us_per_atom"],
                    "throughput_ratio_vs_reference": None,
                    "reference_note": "nequip-allegro is not installed in this environment"}
    result["partition_max_force_error"] = partition_error(model64)
    print(f"partitioned (2x2x2) vs single-domain max force error: {result['partition_max_force_error']:.1e}")
    print("ghost images per owned atom:")
    result.update(ghost_ratios([2, 3, 4, 6] if args.quick else [2, 3, 4, 6, 8]))
    print("Ray actors:")
    result.update(actors(model, 5 if args.quick else 8, 2 if args.quick else 3))
    print("partitioner alone:")
    result.update(partitioner_at_scale(10 ** 6 if args.quick else 10 ** 7, [8, 64, 216, 1000]))
    out = ROOT / "benchmarks" / "results" / "allegro_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))


if __name__ == "__main__":
    main()
