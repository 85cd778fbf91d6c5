"""A worker process killed mid-run (SIGKILL, a real kill) costs a restart, not the run.

Real Ray Train (2 workers, gloo), real MLflow (sqlite), real checkpoints on disk. The test learns
each worker's pid from the run's own "worker" events, kills rank 1 with SIGKILL once the run is
past its first checkpoint, and checks that Ray Train restarted the worker group
(`failure.max_failures`), the loop resumed from the newest complete checkpoint, the run finished,
and MLflow holds every logged step exactly once. For DDP the final weights also equal those of an
uninterrupted run (exact resume; see test_resume.py for why bit-equality is expected).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
# Slow enough per step (~0.1 s) that the kill lands mid-run, small enough to finish in seconds.
SMALL = ["model.dim=96", "model.depth=2", "data.seq_len=128", "data.max_bytes=300000",
         "train.steps=60", "train.batch_size=16", "train.log_every=1", "train.eval_every=0",
         "train.eval_batches=1", "train.checkpoint_every=10", "train.warmup_steps=5",
         "failure.max_failures=1", "checkpoint.keep=0"]
KILL_AFTER = 13  # past the first checkpoint (step 10)


def run_and_kill(spec):
    """Run `spec`, SIGKILL rank 1 once step KILL_AFTER is reported; return (result, records, killed pid)."""
    records: list[dict] = []
    pids: dict[int, int] = {}
    killed: list[int] = []
    lock = threading.Lock()

    def on_record(r: dict) -> None:
        records.append(r)
        with lock:
            if r.get("event") == "worker":
                pids[r["rank"]] = r["pid"]
            elif not killed and r.get("step", 0) >= KILL_AFTER and "event" not in r:
                killed.append(pids[1])
                os.kill(pids[1], signal.SIGKILL)

    result = run_job(spec, on_record=on_record, quiet=True)
    return result, records, (killed[0] if killed else None)


def assert_restarted_and_complete(spec, result, records, killed):
    assert killed is not None, "the run ended before the kill"
    assert result.status == "FINISHED" and result.error is None, result.error
    workers = [r for r in records if r.get("event") == "worker"]
    assert len(workers) == 4, "expected two worker groups of two (the second after the restart)"
    assert killed not in {w["pid"] for w in workers[2:]}
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] % 10 == 0 and 10 <= resumed[0]["step"] < 60
    history = client().get_metric_history(result.run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, spec.train.steps + 1)), "steps duplicated or missing in MLflow"
    assert result.checkpoint.endswith(ckpt.dir_name(60))


@pytest.mark.slow
def test_sigkilled_ddp_worker_restarts_and_finishes_exactly(ray_cluster):
    spec = load_job(JOB, SMALL)
    straight = run_job(spec, quiet=True)
    assert straight.status == "FINISHED"
    result, records, killed = run_and_kill(spec)
    assert_restarted_and_complete(spec, result, records, killed)
    a = load_file(str(Path(straight.checkpoint) / ckpt.WEIGHTS))
    b = load_file(str(Path(result.checkpoint) / ckpt.WEIGHTS))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0, msg=k)


@pytest.mark.slow
def test_sigkilled_deepspeed_worker_restarts_and_finishes(ray_cluster):
    spec = load_job(JOB, [*SMALL, "sharding.strategy=deepspeed", "sharding.zero_stage=2"])
    result, records, killed = run_and_kill(spec)
    assert_restarted_and_complete(spec, result, records, killed)


@pytest.mark.slow
def test_without_max_failures_a_killed_worker_fails_the_run(ray_cluster):
    spec = load_job(JOB, [*SMALL, "failure.max_failures=0"])
    result, records, killed = run_and_kill(spec)
    assert killed is not None
    assert result.status == "FAILED" and result.error is not None
    # The checkpoint written before the kill is complete and can be resumed from.
    assert result.checkpoint and ckpt.read_manifest(*_local(result.checkpoint)) is not None


def _local(path: str):
    import pyarrow.fs as pafs
    return pafs.LocalFileSystem(), path
