"""The per-worker training loop that Ray Train runs on every worker.

It builds the family's model identically on every rank, hands it to the sharding engine, restores
the newest complete checkpoint if there is one, and trains. Progress goes to the driver through the
run's `Channel` actor from rank 0 only (fire-and-forget calls, no barrier); `ray.train.report` is
called by all ranks only when a checkpoint is written, since it is a barrier.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from shipyard.registry import MODELS
from shipyard.spec import JobSpec, parse_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.data import ShardedBatches, eval_batches
from shipyard.train.parallelize import Engine, lr_at, parallelize
from shipyard.train.storage import filesystem


def train_loop(config: dict) -> None:
    spec: JobSpec = parse_job(config["spec"])
    # Ray Train logs every checkpoint twice per worker at INFO; the driver's progress says it once.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    channel = config["channel"]
    if os.path.isdir(config["cwd"]):  # relative paths in the spec mean the same as on the driver
        os.chdir(config["cwd"])
    stop_at: int | None = config.get("stop_at")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    family = MODELS[spec.family]

    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = family.build(spec.model)
    train_set, val_set = family.datasets(spec.model, spec.data, Path(config["cache_dir"]))
    engine = parallelize(model, spec, family.shard_units(model), device)
    torch.manual_seed(spec.train.seed + 1 + rank)  # per-rank stream for dropout and sampling

    step = batches = 0
    start = _checkpoint_to_resume(config["run_dir"], spec)
    if start is not None:
        with start.as_directory() as d:
            meta = ckpt.restore(Path(d), engine, rank)
        step, batches = meta.step, meta.batches
        if rank == 0:
            channel.push.remote({"event": "resumed", "step": step, "checkpoint": start.path})

    total = spec.train.steps
    data = iter(ShardedBatches(train_set, spec.train.batch_size, rank, world, spec.train.seed, start=batches))
    window = _Window()
    saved_at = step if start is not None else -1
    while step < total:
        engine.model.train()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
        loss, metrics = family.loss(engine.model, batch, step, total)
        engine.backward(loss)
        grad_norm = engine.step(lr_at(step, spec.train))
        step += 1
        batches += 1
        window.add(metrics, grad_norm)

        boundary = step == total or step == stop_at
        if step % spec.train.log_every == 0 or boundary:
            record = window.reduce(step, spec.train.batch_size)
            record["lr"] = lr_at(step - 1, spec.train)
            if not math.isfinite(record["train/loss"]):
                raise FloatingPointError(f"the training loss is {record['train/loss']} at step {step}; "
                                         f"the last complete checkpoint is from step {max(saved_at, 0)}")
            if rank == 0:
                channel.push.remote(record)
            stop_requested = _agree(rank == 0 and ray.get(channel.stop_requested.remote()))
        else:
            stop_requested = False
        if (spec.train.eval_every and step % spec.train.eval_every == 0) or step == total:
            val = evaluate(engine, family, val_set, spec, rank, world, device)
            if rank == 0 and val:
                channel.push.remote({"step": step, **val})
        periodic = spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0
        if periodic or boundary or stop_requested:
            _save(engine, spec, step, batches, rank, world, family)
            saved_at = step
        if stop_requested or step == stop_at:
            break
    if saved_at != step:  # resumed at or past the end: still hand back the final checkpoint
        _save(engine, spec, step, batches, rank, world, family)


def evaluate(engine: Engine, family, val_set, spec: JobSpec, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    engine.model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = 0
    with torch.no_grad():
        for batch in eval_batches(val_set, spec.train.batch_size, rank, world, spec.train.eval_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            for k, v in family.evaluate(engine.model, batch).items():
                sums[k] = sums.get(k, 0) + v.detach().float().cpu()
            n += 1
    if not n:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([sums[k] / n for k in keys])
    dist.all_reduce(stacked)
    return {f"val/{k}": float(v) / world for k, v in zip(keys, stacked)}


class _Window:
    """Sums of this worker's metrics since the last report; reduced over workers on report."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.grad_norm = 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], grad_norm: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float().cpu()
        self.steps += 1
        self.grad_norm = grad_norm

    def reduce(self, step: int, global_batch: int) -> dict[str, float]:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] / self.steps for k in keys])
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, **{f"train/{k}": float(v) for k, v in zip(keys, stacked)},
                  "grad_norm": self.grad_norm, "samples_per_s": self.steps * global_batch / elapsed}
        self.__init__()
        return record


def _agree(flag: bool) -> bool:
    """Rank 0's decision, made known to every rank (all must leave the loop together)."""
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _checkpoint_to_resume(run_dir: str, spec: JobSpec) -> ray.train.Checkpoint | None:
    """The newest complete checkpoint of this run, whether Ray restarted the workers after a
    failure or `shipyard resume` started the run again; incomplete ones are passed over."""
    fs, path = filesystem(run_dir, spec.storage)
    found = ckpt.latest_complete(fs, path)
    return ray.train.Checkpoint(found, filesystem=fs) if found else None


def _save(engine: Engine, spec: JobSpec, step: int, batches: int, rank: int, world: int, family) -> None:
    meta = ckpt.Meta(step=step, batches=batches, family=spec.family, strategy=spec.sharding.strategy,
                     world_size=world, spec=spec.to_dict(),
                     curriculum=family.curriculum_state(spec.model, step, spec.train.steps) if family.curriculum_state else None)
    with tempfile.TemporaryDirectory(prefix="shipyard-ckpt-") as tmp:
        ckpt.write(Path(tmp), engine, meta, rank)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=ckpt.dir_name(step))
