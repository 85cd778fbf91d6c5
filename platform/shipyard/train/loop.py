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

    # Where each worker runs (the driver records it; tests kill workers by pid and check placement).
    group = ray.util.get_current_placement_group()
    channel.push.remote({"event": "worker", "rank": rank, "pid": os.getpid(),
                         "node_id": ray.get_runtime_context().get_node_id(),
                         "placement_group": group.id.hex() if group else None})

    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = family.build(spec.model)
    train_set, val_set = family.datasets(spec.model, spec.data, Path(config["cache_dir"]))
    engine = parallelize(model, spec, family.shard_units(model), device)
    torch.manual_seed(spec.train.seed + 1 + rank)  # per-rank stream for dropout and sampling

    step = batches = 0
    start = _checkpoint_to_resume(config["run_dir"], spec)
    if start is None and config.get("start_from"):
        # A new run that continues another run's state (a PBT trial cloning a better one): the
        # weights, optimizer, RNG, step and data position come from that checkpoint, the
        # hyperparameters from this run's spec.
        fs, path = filesystem(config["start_from"], spec.storage)
        if ckpt.read_manifest(fs, path) is None:
            raise FileNotFoundError(f"start_from: {config['start_from']} is not a complete checkpoint")
        start = ray.train.Checkpoint(path, filesystem=fs)
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
    last_metrics: dict[str, float] = {}  # latest train window and val metrics, kept in checkpoints
    skipped_in_a_row = 0
    while step < total:
        engine.model.train()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
        try:
            outcome = train_step(engine, family, batch, step, total, spec.train)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e} The last complete checkpoint is from step {max(saved_at, 0)}"
                                + (" (`shipyard resume` continues from it)." if saved_at > 0 else ".")) from None
        step += 1
        batches += 1
        if outcome is None:
            skipped_in_a_row += 1
            window.skipped += 1
            if rank == 0:
                channel.push.remote({"event": "skipped", "step": step})
            if skipped_in_a_row >= spec.train.max_skipped_steps:
                raise NonFiniteLoss(
                    f"the training loss was non-finite for {skipped_in_a_row} steps in a row (up to step "
                    f"{step}; train.max_skipped_steps={spec.train.max_skipped_steps}): the run diverged; "
                    f"the last complete checkpoint is from step {max(saved_at, 0)}")
        else:
            skipped_in_a_row = 0
            window.add(*outcome)

        boundary = step == total or step == stop_at
        if step % spec.train.log_every == 0 or boundary:
            record = window.reduce(step, spec.train.batch_size)
            record["lr"] = lr_at(step - 1, spec.train)
            last_metrics.update({k: v for k, v in record.items() if k.startswith("train/")})
            if rank == 0:
                channel.push.remote(record)
            stop_requested = _agree(rank == 0 and ray.get(channel.stop_requested.remote()))
        else:
            stop_requested = False
        if (spec.train.eval_every and step % spec.train.eval_every == 0) or step == total:
            val = evaluate(engine, family, val_set, spec, rank, world, device)
            last_metrics.update(val)
            if rank == 0 and val:
                channel.push.remote({"step": step, **val})
        periodic = spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0
        if periodic or boundary or stop_requested:
            _save(engine, spec, step, batches, rank, world, family, last_metrics, config["run_dir"])
            saved_at = step
            if rank == 0:
                channel.push.remote({"event": "checkpoint", "step": step,
                                     "path": f"{config['run_dir'].rstrip('/')}/{ckpt.dir_name(step)}"})
        if stop_requested or step == stop_at:
            break
    if saved_at != step:  # resumed at or past the end: still hand back the final checkpoint
        _save(engine, spec, step, batches, rank, world, family, last_metrics, config["run_dir"])


class NonFiniteLoss(FloatingPointError):
    """The training loss was NaN or inf on some worker (`train.nonfinite`)."""


def train_step(engine: Engine, family, batch: dict, step: int, total: int,
               train) -> tuple[dict[str, torch.Tensor], float] | None:
    """One optimizer step (`step` counts completed steps). Returns the step's metrics and the
    gradient norm, or None when the loss (on any worker) or the global gradient norm was NaN/inf
    and `train.nonfinite` is `skip`: then no worker updates anything (parameters and optimizer
    state stay as they were). With `fail` it raises `NonFiniteLoss` naming the step (1-based,
    as logged); nothing of that step was applied, so the last checkpoint holds finite weights."""
    loss, metrics = family.loss(engine.model, batch, step, total)
    if not _finite_on_every_worker(loss):
        if train.nonfinite == "fail":
            value = loss.detach().float().item()
            raise NonFiniteLoss(
                f"the training loss is not finite at step {step + 1} (this worker saw {value}); the run "
                f"diverged or the batch holds NaN/inf. Lower train.lr, keep train.grad_clip on, or set "
                f"train.nonfinite: skip to drop such steps.")
        engine.skip(loss)
        return None
    engine.backward(loss)
    grad_norm = engine.step(lr_at(step, train))  # every engine drops the update on a NaN/inf norm
    if not math.isfinite(grad_norm):
        if train.nonfinite == "fail":
            raise NonFiniteLoss(
                f"the gradient norm is {grad_norm} at step {step + 1} (the loss was finite); the run "
                f"diverged. Lower train.lr, keep train.grad_clip on, or set train.nonfinite: skip.")
        return None
    return metrics, grad_norm


def _finite_on_every_worker(loss: torch.Tensor) -> bool:
    flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


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
        self.steps, self.skipped, self.grad_norm = 0, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], grad_norm: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float().cpu()
        self.steps += 1
        self.grad_norm = grad_norm

    def reduce(self, step: int, global_batch: int) -> dict[str, float]:
        """Collective. Skipped steps count in throughput, not in the averages."""
        keys = sorted(self.sums)
        record: dict[str, float] = {"step": step}
        if keys:  # every step of the window may have been skipped (then all ranks have no keys)
            stacked = torch.stack([self.sums[k] / self.steps for k in keys])
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
            record.update({f"train/{k}": float(v) for k, v in zip(keys, stacked)})
            record["grad_norm"] = self.grad_norm
        elapsed = time.perf_counter() - self.t0
        record["samples_per_s"] = (self.steps + self.skipped) * global_batch / elapsed
        if self.skipped:
            record["skipped_steps"] = self.skipped
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


def _save(engine: Engine, spec: JobSpec, step: int, batches: int, rank: int, world: int, family,
          metrics: dict[str, float], run_dir: str) -> None:
    meta = ckpt.Meta(step=step, batches=batches, family=spec.family, strategy=spec.sharding.strategy,
                     world_size=world, spec=spec.to_dict(), metrics=dict(metrics),
                     curriculum=family.curriculum_state(spec.model, step, spec.train.steps) if family.curriculum_state else None)
    with tempfile.TemporaryDirectory(prefix="shipyard-ckpt-") as tmp:
        ckpt.write(Path(tmp), engine, meta, rank)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=ckpt.dir_name(step))
    if rank == 0 and spec.checkpoint.keep:
        fs, path = filesystem(run_dir, spec.storage)
        ckpt.prune(fs, path, spec.checkpoint.keep, spec.checkpoint.best_metric, spec.checkpoint.best_mode)
