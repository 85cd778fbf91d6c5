"""The Tracker on the default embedded sqlite store (no server): unchanged behaviour, no outage
machinery in the way; a batch the store rejects is an error, not an outage; the fail-fast HTTP
settings exist only during the Tracker's own calls and never override the user's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from shipyard.cluster import home
from shipyard.spec import load_job
from shipyard.train.tracking import FAIL_FAST_HTTP, Tracker, _fail_fast_http, client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"


def _tracker(tmp_path, notes):
    spec = load_job(JOB, ["train.steps=6", "tracking.experiment=buffer-unit"])
    assert spec.tracking.uri is None and spec.tracking.required is False
    return Tracker(spec, "sqlite-run", str(tmp_path / "run"), note=notes.append)


def test_sqlite_store_logs_each_step_once_and_finishes(tmp_path):
    notes: list[str] = []
    tracker = _tracker(tmp_path, notes)
    assert tracker.uri == f"sqlite:///{home() / 'mlflow.db'}"
    tracker.log([{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}])
    tracker.log([{"step": 2, "train/loss": 9.0}, {"step": 3, "train/loss": 1.0}])  # step 2 again: skipped
    tracker.set_tag("checkpoint", "/runs/x/checkpoint_000003")
    assert tracker.finish("FINISHED", {"step": 3, "train/loss": 1.0}) is None

    mlflow = client()
    assert [(m.step, m.value) for m in mlflow.get_metric_history(tracker.run_id, "train/loss")] == [
        (1, 3.0), (2, 2.0), (3, 1.0)]
    run = mlflow.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["shipyard.checkpoint"] == "/runs/x/checkpoint_000003"
    assert notes == [] and tracker.buffer == [] and tracker.tags == {}
    assert not (home() / "unsent" / f"{tracker.run_id}.json").exists()


def test_a_rejected_batch_is_an_error_not_an_outage(tmp_path):
    notes: list[str] = []
    tracker = _tracker(tmp_path, notes)
    with pytest.raises(MlflowException, match="bad!name"):
        tracker.log([{"step": 1, "bad!name": 1.0}])
    assert tracker.buffer == [] and tracker.outage is None and notes == []  # dropped, not retried forever
    tracker.log([{"step": 2, "train/loss": 2.0}])
    assert [m.step for m in client().get_metric_history(tracker.run_id, "train/loss")] == [2]


def test_fail_fast_http_settings_are_scoped_and_yield_to_the_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")  # the user's own setting
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    with _fail_fast_http():
        with _fail_fast_http():  # nested/concurrent callers share them
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == FAIL_FAST_HTTP["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == FAIL_FAST_HTTP["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
