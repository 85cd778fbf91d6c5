"""Checkpoints in object storage, against a real S3 API: moto's server on 127.0.0.1.

The job names the endpoint and credentials in its spec (Ray workers of the shared test cluster do
not see environment variables set by a test); the driver-side tools also work from the usual AWS
environment variables, `AWS_ENDPOINT_URL` included.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shipyard.cli import main
from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.storage import filesystem
from shipyard.train.tracking import client

from s3_server import SECRET, start_moto

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000", "train.steps=6",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
        "train.checkpoint_every=2", "tracking.experiment=s3"]


def spec_for(endpoint: str, *extra: str):
    return load_job(JOB, [*TINY, "storage.path=s3://shipyard/runs", f"storage.endpoint_url={endpoint}",
                          "storage.region=us-east-1", "storage.access_key_id=AKIATEST",
                          f"storage.secret_access_key={SECRET}", *extra])


@pytest.mark.slow
def test_save_list_resume_and_export_through_s3(ray_cluster, s3, aws_env, tmp_path):
    spec = spec_for(s3)
    first = run_job(spec, stop_at=4, quiet=True)
    assert first.status == "KILLED" and first.checkpoint.startswith("s3://shipyard/runs/")

    fs, run_dir = filesystem(first.checkpoint.rsplit("/", 1)[0])  # endpoint from AWS_ENDPOINT_URL
    assert ckpt.latest_complete(fs, run_dir).endswith(ckpt.dir_name(4))
    listed = sorted(i.base_name for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(run_dir))
                    if i.base_name.startswith(ckpt.PREFIX))
    assert listed == [ckpt.dir_name(2), ckpt.dir_name(4)]

    # a checkpoint whose manifest never arrived is passed over on resume
    fs.delete_file(f"{run_dir}/{ckpt.dir_name(4)}/{ckpt.MANIFEST}")
    events: list[dict] = []
    second = run_job(spec, resume=(first.run_id, first.run_name), on_record=events.append, quiet=True)
    assert second.status == "FINISHED" and second.checkpoint.endswith(ckpt.dir_name(6))
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [2]
    steps = [m.step for m in client().get_metric_history(first.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 7))

    assert main(["export", first.run_id, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 1000

    # the secret is nowhere: not in MLflow params, the spec artifact, nor the checkpoint metadata
    mlflow = client()
    run = mlflow.get_run(first.run_id)
    assert SECRET not in json.dumps(run.data.params) and SECRET not in json.dumps(run.data.tags)
    assert SECRET not in Path(mlflow.download_artifacts(first.run_id, "spec.yaml")).read_text()
    with fs.open_input_stream(f"{run_dir}/{ckpt.dir_name(6)}/{ckpt.META}") as f:
        assert SECRET not in f.read().decode()


@pytest.mark.slow
def test_storage_going_away_mid_run_fails_clearly_and_keeps_complete_checkpoints(ray_cluster, tmp_path):
    """Kill the S3 server after the first checkpoint: the next upload fails, the run reports it."""
    proc, endpoint = start_moto()
    spec = spec_for(endpoint, "train.steps=400", "train.checkpoint_every=3")

    def kill_after_first_checkpoint(record):
        if record.get("step", 0) >= 4 and proc.poll() is None:
            proc.kill()

    result = run_job(spec, on_record=kill_after_first_checkpoint, quiet=True)
    assert result.status == "FAILED" and result.error is not None
    assert result.metrics["step"] < 400
    assert client().get_run(result.run_id).info.status == "FAILED"
