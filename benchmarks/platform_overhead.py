"""What the platform costs: `shipyard run`'s training loop vs a bare PyTorch loop, and 2 workers vs 1.

    python benchmarks/platform_overhead.py [--quick]

Same model (the flagship minGRU LM at benchmark size), same per-worker batch, one torch thread per
worker everywhere. Throughput inside `shipyard run` is what its loop measures between reports
(startup excluded, the first window dropped as warm-up); the bare loop is timed the same way.

Figures (benchmarks/results/platform_overhead.json):
  overhead_ratio            bare steps/s / shipyard steps/s, 1 worker, ddp (goal <= 1.05)
  overhead_ratio_<s>        the same for each strategy s
  scaling_efficiency_2w     samples/s with 2 workers / (2 x samples/s with 1 worker), ddp, weak scaling
  scaling_efficiency_2w_<s> the same for each strategy
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "minrnn" / "stdlib-code.yaml"
PER_WORKER_BATCH = 16


def overrides(steps: int, workers: int, strategy: str) -> list[str]:
    extra = {"ddp": [], "fsdp": ["sharding.strategy=fsdp"],
             "deepspeed": ["sharding.strategy=deepspeed", "sharding.zero_stage=2"]}[strategy]
    return ["model.dim=128", "model.depth=2", "data.seq_len=128", "data.max_bytes=2000000",
            f"train.steps={steps}", f"train.batch_size={PER_WORKER_BATCH * workers}", "train.log_every=10",
            "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0",
            "train.warmup_steps=0", f"scaling.num_workers={workers}", *extra]


def shipyard_samples_per_s(steps: int, workers: int, strategy: str) -> float:
    from shipyard.spec import load_job
    from shipyard.train.launch import run_job
    records: list[dict] = []
    result = run_job(load_job(JOB, overrides(steps, workers, strategy)), on_record=records.append, quiet=True)
    if result.error:
        raise RuntimeError(f"{strategy} x{workers} failed: {result.error}")
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > 10]
    return statistics.median(rates)


def bare_samples_per_s(steps: int) -> float:
    """The loop a user would write by hand: one process, no Ray, no checkpoints, no tracking."""
    from shipyard.registry import MODELS
    from shipyard.spec import load_job
    from shipyard.train.data import ShardedBatches
    spec = load_job(JOB, overrides(steps, 1, "ddp"))
    family = MODELS["minrnn"]
    torch.manual_seed(0)
    model = family.build(spec.model)
    train_set, _ = family.datasets(spec.model, spec.data, ROOT / ".shipyard" / "data")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, betas=(0.9, 0.95))
    batches = iter(ShardedBatches(train_set, PER_WORKER_BATCH, 0, 1, seed=0))
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss, _ = family.loss(model, next(batches), step, steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            float(loss.detach())  # sync, as a real loop logging its loss would
            now = time.perf_counter()
            if step > 10:
                rates.append(10 * PER_WORKER_BATCH / (now - t0))
            t0 = now
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 50 if args.quick else 150
    strategies = ["ddp", "fsdp", "deepspeed"]
    torch.set_num_threads(1)

    bare = bare_samples_per_s(steps)
    rows, figures = [], {}
    for s in strategies:
        one = shipyard_samples_per_s(steps, 1, s)
        two = shipyard_samples_per_s(steps, 2, s)
        figures[f"overhead_ratio_{s}"] = round(bare / one, 3)
        figures[f"scaling_efficiency_2w_{s}"] = round(two / (2 * one), 3)
        rows.append((s, one, two))
        print(f"{s:10s} 1 worker {one:8.1f} samples/s   2 workers {two:8.1f} samples/s", flush=True)
    figures["overhead_ratio"] = figures["overhead_ratio_ddp"]
    figures["scaling_efficiency_2w"] = figures["scaling_efficiency_2w_ddp"]
    figures["bare_samples_per_s"] = round(bare, 1)
    figures.update(quick=args.quick, cores=os.cpu_count())

    print(f"\nbare PyTorch loop, 1 process: {bare:.1f} samples/s (batch {PER_WORKER_BATCH}, 1 thread)")
    print(f"{'strategy':10s} {'overhead (bare/shipyard)':>26s} {'scaling efficiency 2w':>22s}")
    for s, _, _ in rows:
        print(f"{s:10s} {figures[f'overhead_ratio_{s}']:26.3f} {figures[f'scaling_efficiency_2w_{s}']:22.3f}")
    out = ROOT / "benchmarks" / "results" / "platform_overhead.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
