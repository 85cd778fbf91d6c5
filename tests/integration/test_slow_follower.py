"""The driver's progress follower is still busy when the run ends (an `on_record` callback is slow).

Real Ray Train, real MLflow (sqlite), real checkpoints. The slow consumer is real too: the callback
holds the follower on the final step's record for longer than the launcher used to wait for it (30 s),
which recorded a finished run as KILLED (seen in CI, where a test's callback held it through a tracking
server restart). Now the launcher waits longer (FOLLOWER_WAIT_S) and, when even that runs out, takes
the status from the run's newest complete checkpoint (the loop always checkpoints the final step).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train import launch
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
STEPS = 6
TINY = ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000", "train.batch_size=8",
        f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
        "train.checkpoint_every=3", "train.warmup_steps=1"]
HOLD_S = 50.0  # past the 30 s the launcher used to wait, counted from when fit() returns


def _holding(seen: list[dict]):
    """An on_record that holds the follower HOLD_S on the first record of the final step."""
    def on_record(r: dict) -> None:
        seen.append(r)
        if r.get("step") == STEPS and "event" not in r and sum(x.get("step") == STEPS for x in seen) == 1:
            time.sleep(HOLD_S)
    return on_record


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_slow_follower_is_waited_for_and_nothing_is_lost(ray_cluster, capfd):
    seen: list[dict] = []
    result = launch.run_job(load_job(JOB, TINY), quiet=True, on_record=_holding(seen))
    assert result.status == "FINISHED", result.error
    assert result.metrics["step"] == STEPS  # the final records were drained, not left behind
    assert result.checkpoint.endswith(ckpt.dir_name(STEPS))
    assert "waiting up to" in capfd.readouterr().err
    mlflow = client(result.tracking_uri)
    assert [m.step for m in mlflow.get_metric_history(result.run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_past_the_wait_the_status_comes_from_the_final_checkpoint(ray_cluster, capfd, monkeypatch):
    monkeypatch.setattr(launch, "FOLLOWER_WAIT_S", 12.0)  # shorter than the hold: the launcher gives up
    seen: list[dict] = []
    result = launch.run_job(load_job(JOB, TINY), quiet=True, on_record=_holding(seen))
    assert result.status == "FINISHED", result.error  # before: KILLED, from the follower's stale step
    assert result.metrics["step"] < STEPS  # the held records were indeed not drained
    assert result.checkpoint.endswith(ckpt.dir_name(STEPS))
    err = capfd.readouterr().err
    assert f"gave up on the progress records after step {result.metrics['step']}" in err, err[-2000:]
    mlflow = client(result.tracking_uri)
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    logged = [m.step for m in mlflow.get_metric_history(result.run_id, "train/loss")]
    time.sleep(HOLD_S)  # the follower wakes up after the run has ended: it must log nothing more
    assert [m.step for m in mlflow.get_metric_history(result.run_id, "train/loss")] == logged
    assert max(logged) < STEPS
