"""A job logs to a real `mlflow server` on 127.0.0.1: one run with params, tags, metrics, artifacts."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow_server import MlflowServer

from shipyard.spec import load_job
from shipyard.train.launch import run_job
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000", "train.steps=4",
        "train.batch_size=8", "train.log_every=2", "train.eval_every=2", "train.eval_batches=1"]


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server.uri
    server.kill()


@pytest.mark.slow
def test_one_run_per_job_on_a_real_tracking_server(ray_cluster, mlflow_server):
    spec = load_job(JOB, [*TINY, f"tracking.uri={mlflow_server}", "tracking.experiment=server-test"])
    result = run_job(spec, quiet=True)
    assert result.status == "FINISHED" and result.tracking_uri == mlflow_server

    mlflow = client(mlflow_server)
    exp = mlflow.get_experiment_by_name("server-test")
    runs = mlflow.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # one run for the job, not one per worker
    run = runs[0]
    assert run.data.params["train.steps"] == "4" and run.data.params["model.family"] == "minrnn"
    assert run.data.params["scaling.num_workers"] == "2"
    tags = run.data.tags
    assert (tags["shipyard.family"], tags["shipyard.strategy"], tags["shipyard.world_size"]) == ("minrnn", "ddp", "2")
    assert len(tags["mlflow.source.git.commit"]) in (40, 7) or tags["mlflow.source.git.commit"] == "unknown"
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [2, 4]
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "val/loss")] == [2, 4]
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "final_metrics.json", "loss_curve.png"} <= artifacts
    png = Path(mlflow.download_artifacts(run.info.run_id, "loss_curve.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
