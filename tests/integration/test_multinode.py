"""The same job on a real two-node Ray cluster, submitted through the Ray Jobs API.

`cluster/local/ray-local.sh up` starts a head and a second node as separate processes on
127.0.0.1 (one CPU each, token authentication on, the token in a file of the test's own). The CLI
runs in subprocesses exactly as a user would run it: `shipyard submit` ships the code and the spec,
the two training workers land on different nodes (checked by the node ids the run records),
metrics land in MLflow and checkpoints in S3 (moto's server, whose credentials the nodes have in
their environment: they are never sent with the job).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import SECRET, free_port

from shipyard.train import checkpoint as ckpt
from shipyard.train.storage import filesystem
from shipyard.train.tracking import client

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local" / "ray-local.sh"
TINY = ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000", "train.steps=6",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
        "train.checkpoint_every=3", "scaling.num_workers=2", "scaling.placement=spread",
        "tracking.experiment=multinode"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    state = tmp_path_factory.mktemp("ray-local")
    port, dash = free_port(), free_port()
    env = {**os.environ, "SHIPYARD_CLUSTER_DIR": str(state), "RAY_PORT": str(port),
           "RAY_DASHBOARD_PORT": str(dash), "RAY_NODE_CPUS": "1",
           "AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_REGION": "us-east-1"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        token = (state / "auth_token").read_text()
        assert len(token) == 64 and (state / "auth_token").stat().st_mode & 0o077 == 0
        client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),
                      "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            client_env.pop(k)  # the submitting machine does not need the storage credentials
        yield {"env": env, "client_env": client_env, "token": token, "address": f"http://127.0.0.1:{dash}"}
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)


def shipyard(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipyard.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def node_ids(cluster) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT), "status"], env=cluster["env"], capture_output=True,
                         text=True, timeout=120)
    return [line.split()[0] for line in out.stdout.splitlines() if " alive " in line]


def test_submit_spreads_workers_and_lands_in_mlflow_and_s3(cluster):
    submitted = shipyard(cluster["client_env"], "submit", str(ROOT / "jobs/minrnn/stdlib-code.yaml"), *TINY,
                         "storage.path=s3://shipyard/multinode", "--follow")
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert cluster["token"] not in output
    job_id = next(line.split()[1] for line in submitted.stdout.splitlines() if line.startswith("submitted "))
    assert f"{job_id}: SUCCEEDED" in submitted.stdout

    status = shipyard(cluster["client_env"], "status", job_id)
    assert "SUCCEEDED" in status.stdout, status.stdout + status.stderr

    mlflow = client()
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("multinode").experiment_id],
                                filter_string=f"attributes.run_name = '{job_id}'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))
    workers = json.loads(run.data.tags["shipyard.workers"])
    alive = node_ids(cluster)
    assert len(alive) == 2
    assert len(set(workers.values())) == 2, f"both workers on one node: {workers}"
    assert {n[:12] for n in workers.values()} == set(alive)

    checkpoint = run.data.tags["shipyard.checkpoint"]
    assert checkpoint == f"s3://shipyard/multinode/{job_id}/{ckpt.dir_name(6)}"
    os.environ.update({k: cluster["env"][k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                      "AWS_SECRET_ACCESS_KEY", "AWS_REGION")})
    try:
        fs, path = filesystem(checkpoint)
        assert ckpt.read_manifest(fs, path) is not None
    finally:
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
            os.environ.pop(k, None)


def test_stop_a_running_job(cluster):
    submitted = shipyard(cluster["client_env"], "submit", str(ROOT / "jobs/minrnn/stdlib-code.yaml"), *TINY,
                         "train.steps=100000", "train.checkpoint_every=0")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = next(line.split()[1] for line in submitted.stdout.splitlines() if line.startswith("submitted "))
    deadline = time.time() + 180
    mlflow = client()
    while not _logged_steps(mlflow, job_id):  # training has begun
        assert time.time() < deadline, shipyard(cluster["client_env"], "logs", job_id).stdout[-3000:]
        time.sleep(2)
    stopped = shipyard(cluster["client_env"], "stop", job_id)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stdout + stopped.stderr
    while "STOPPED" not in shipyard(cluster["client_env"], "status", job_id).stdout:
        assert time.time() < deadline + 60, "the job did not stop"
        time.sleep(2)
    logs = shipyard(cluster["client_env"], "logs", job_id)
    assert logs.returncode == 0 and f"run job.yaml --run-name {job_id}" in logs.stdout
    # The stop was graceful (SIGINT, like Ctrl-C): the run checkpointed and can be resumed.
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("multinode").experiment_id],
                                filter_string=f"attributes.run_name = '{job_id}'")
    assert run.info.status == "KILLED", logs.stdout[-3000:]
    assert "checkpoint-" in run.data.tags.get("shipyard.checkpoint", ""), logs.stdout[-3000:]


def _logged_steps(mlflow, run_name: str) -> int:
    exp = mlflow.get_experiment_by_name("multinode")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'") if exp else []
    return len(mlflow.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0


def test_a_client_without_the_token_is_refused_clearly(cluster, tmp_path):
    env = {k: v for k, v in cluster["client_env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = shipyard(env, "status")
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output
    assert "token" in output.lower() and cluster["token"] not in output
