"""Allegro scaling: O(N) energy+forces, ghosts vs domain width, 1 vs 2 Ray actors, and the
model-free partitioner at cluster scale.

Claims (Musaelian et al., 2023): a strictly local model costs O(N) (time per atom flat in N), and
a box split into domains needs only a ghost shell of width r_max around each, so the work and the
messages per domain scale with its volume and surface, not with the system.

Measured here, all in one run (untrained model with the `jobs/allegro/emt-cu.yaml` sizes, float32,
one thread, neighbour list included; fcc Cu supercells with thermal-sized displacements). Times
are the best of several calls in CPU (process) seconds: the machine is shared, and a single-thread
process's CPU time is what it would take on an idle core, where wall time also counts the other
processes it waits behind (both are in the JSON):
* `time_per_atom_ratio_largest_vs_smallest`: energy+forces seconds per atom at the largest N over
  the smallest (1.0 = perfectly O(N)); the table lists atom-steps/s for every N.
* `throughput_ratio_vs_reference`: CPU seconds of the reference `nequip-allegro` 0.8.3 (nequip
  0.19.1, torch 2.13.0, its own environment `.venv-ref`, run in a subprocess by
  `allegro_reference.py`) over ours, at the largest N (`_min`: the smallest ratio over all N; per-N
  rows in `reference_throughput`). Same structures (handed over as arrays), same hyperparameters
  (species, r_max 4.5, l_max 1, 2 layers, 8 tensor channels, latent/MLP width 32, 8 trainable
  Bessel functions, polynomial cutoff p = 6, avg_num_neighbors 40; float32), same thread count,
  repeats and warm-up. Each side runs its own user path from an ASE structure: ours
  `calculator.predict` (cell-list neighbour search in NumPy, then the model), the reference its
  `NequIPCalculator` around the eager model (`from_ase`, nequip's default matscipy neighbour
  list, energy, forces and stress). Not matched exactly (no counterpart exists): the reference's
  two-body embedding is a product of per-type embeddings and a projected Bessel basis, its MLPs
  have no biases, and its readout reads every layer's scalars (96 wide, ours the last latent, 32);
  it has 13,688 parameters to our 10,569. The reference's compiled paths (`nequip-compile`:
  TorchScript is deprecated on torch >= 2.10, AOTInductor needs a C++ toolchain and a checkpoint
  file) are not timed. The edge counts of both sides are compared (`reference_edges_match`).
* `partition_max_force_error`: max |F_partitioned - F_single| / max |F_single| (float64, 2x2x2
  domains): the partition is exact up to summation order.
* `ghost_over_owned_at_width_<w>`: ghost images per owned atom for cubic domains w * r_max wide.
* `weak_scaling_efficiency_2_actors`: t(1 actor, N) / t(2 actors, 2N); `strong_speedup_2_actors`:
  t(1 actor, N) / t(2 actors, N), wall seconds. On a shared 2-core machine these bound what to
  expect, no more.
* partitioner alone (`shipyard_models.allegro.partition.ghost_pairs`, no model): 10^7 atoms in
  10^3 domains (quick: 10^6 in 10^3), seconds, peak memory, ghosts per atom, the bytes sent per
  MD step (ghost positions out, ghost forces back) and migrations per step for 8..1000 domains.

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


def best_times(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU (process) seconds over `repeats` calls."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def throughput(model, sizes, repeats) -> list[dict]:
    """Energy + forces (+ virial) of `calculator.predict`, neighbour list included, per size."""
    rows = []
    for n in sizes:
        atoms = supercell(n)
        args = (atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, torch.float32)
        predict(model, *args)  # warm-up
        wall, cpu = best_times(lambda: predict(model, *args), repeats)
        rows.append({"atoms": len(atoms), "seconds": wall, "cpu_seconds": cpu, "atom_steps_per_s": len(atoms) / cpu,
                     "us_per_atom": 1e6 * cpu / len(atoms)})
        print(f"  {len(atoms):7d} atoms  {cpu:8.3f} s CPU ({wall:8.3f} s wall)  {len(atoms) / cpu:10.0f} atom-steps/s  "
              f"{1e6 * cpu / len(atoms):8.1f} us/atom")
    return rows


def len_edges(n: int) -> int:
    from shipyard_models.allegro.neighbors import neighbor_list
    atoms = supercell(n)
    return int(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, CFG.r_max)[0].shape[1])


def reference(sizes, repeats: int, ours: list[dict]) -> dict:
    """The reference `nequip-allegro` on the same structures, in its own environment (see
    `allegro_reference.py`), against our rows: CPU seconds ratio per size."""
    import subprocess
    import tempfile
    from dataclasses import asdict
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        return {"throughput_ratio_vs_reference": None,
                "reference_note": f"{python.relative_to(ROOT)} is missing (`make bench` creates it)"}
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {}
        for k, n in enumerate(sizes):
            atoms = supercell(n)
            arrays.update({f"positions_{k}": atoms.positions, f"numbers_{k}": atoms.numbers,
                           f"cell_{k}": atoms.cell.array})
        np.savez(Path(tmp) / "structures.npz", **arrays)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "allegro_reference.py"),
                                   str(Path(tmp) / "structures.npz"), "--config", json.dumps(asdict(CFG)),
                                   "--repeats", str(repeats), "--threads", "1"],
                                  capture_output=True, text=True, timeout=1800, env=env)
        except subprocess.TimeoutExpired:
            return {"throughput_ratio_vs_reference": None, "reference_note": "the reference took over 1800 s"}
    if proc.returncode != 0:
        return {"throughput_ratio_vs_reference": None,
                "reference_note": f"the reference failed: {proc.stderr.strip().splitlines()[-1:]}"}
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for mine, theirs in zip(ours, ref["rows"]):
        ratio = theirs["cpu_seconds"] / mine["cpu_seconds"]
        rows.append({"atoms": theirs["atoms"], "edges": theirs["edges"], "cpu_seconds": theirs["cpu_seconds"],
                     "seconds": theirs["seconds"], "atom_steps_per_s": theirs["atoms"] / theirs["cpu_seconds"],
                     "ours_over_reference_throughput": ratio})
        print(f"  {theirs['atoms']:7d} atoms  reference {theirs['cpu_seconds']:8.3f} s CPU ({theirs['seconds']:8.3f} s "
              f"wall), ours {mine['cpu_seconds']:8.3f} s CPU: ours / reference throughput {ratio:.2f}")
    ratios = [r["ours_over_reference_throughput"] for r in rows]
    ours_edges = [len_edges(n) for n in sizes]
    return {"throughput_ratio_vs_reference": ratios[-1], "throughput_ratio_vs_reference_min": min(ratios),
            "reference_edges_match": ours_edges == [r["edges"] for r in rows],
            "reference": {k: v for k, v in ref.items() if k != "rows"}, "reference_throughput": rows,
            "reference_note": "ratio of CPU seconds, reference / ours, at the largest size (1 thread each; "
                              "ours: calculator.predict, the reference: " + ref["path"] + ")"}


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
        one = PartitionedPotential(model, (1, 1, 1), num_actors=1, dtype="float32", timeout_s=300)
        call(one, small)
        t1 = best_time(lambda: call(one, small), repeats)
        one.shutdown()  # its CPU goes to the 2-actor run (2 logical CPUs in all)
        two = PartitionedPotential(model, (2, 1, 1), num_actors=2, dtype="float32", timeout_s=300)
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
                    "time_per_atom_ratio_largest_vs_smallest": rows[-1]["us_per_atom"] / rows[0]["us_per_atom"]}
    print("the reference nequip-allegro, same structures and hyperparameters (1 thread):")
    result.update(reference(sizes, 2 if args.quick else 3, rows))
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
