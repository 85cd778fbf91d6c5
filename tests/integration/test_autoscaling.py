"""A sweep on an autoscaling Ray cluster: Ray's fake multi-node autoscaler, for real.

The head starts with no CPUs and an autoscaling config whose only worker type has 1 CPU (at most
2 nodes), as in the recipe in ../shared/recipes (`fake_multinode` provider: the autoscaler starts
and stops real raylet processes on this machine). A sweep of 3 trials, each one 1-CPU training
worker, cannot run on the head at all, so:
  - the autoscaler must launch worker nodes, and the trials' workers must run there (the node ids
    each run records);
  - 3 trials need 3 nodes but the cluster stops at 2: the third must queue, not fail (no three
    trial runs overlap in time, and all three finish);
  - once the sweep is over the idle nodes must go away (idle_timeout_minutes 0.2).
The CLI runs in a subprocess exactly as a user would run it: `shipyard sweep FILE --address ...`,
with Optuna choosing the trials' parameters.
The head must use Ray's default port 6379 (the fake nodes dial it); the test fails if it is busy.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from s3_server import free_port

from shipyard.train.tracking import client

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT = 6379

pytestmark = pytest.mark.slow

AUTOSCALER = {
    "cluster_name": "fake_multinode",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.2,
    "docker": {}, "auth": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

NODES = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"],
                   "cpu": n["Resources"].get("CPU", 0)} for n in ray.nodes() if n["Alive"]]))
"""


def alive_nodes(env) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", NODES, f"127.0.0.1:{PORT}"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def autoscaling_cluster(tmp_path):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is in use; the fake autoscaler's nodes can only join a head on {PORT}")
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(AUTOSCALER))
    token = tmp_path / "auth_token"
    token.write_text(os.urandom(24).hex())
    token.chmod(0o600)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "SHIPYARD_HOME": str(tmp_path / "home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")  # short: Ray's socket paths live under it
    log = (tmp_path / "head.log").open("w")
    # `--block` in a session of its own: the head, its autoscaler and every node the autoscaler
    # starts form one process group that the clean-up stops (never a plain `ray stop`, which would
    # stop every Ray process on the machine).
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                             f"--port={PORT}", "--num-cpus=0", f"--autoscaling-config={config}",
                             f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                if alive_nodes(env):
                    break
            except (AssertionError, json.JSONDecodeError, IndexError, subprocess.TimeoutExpired):
                pass
            assert time.monotonic() < deadline, "the head did not come up: " + (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        yield env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sweep_scales_the_cluster_up_queues_what_does_not_fit_and_scales_down(autoscaling_cluster, tmp_path):
    env = autoscaling_cluster
    before = alive_nodes(env)
    assert [n["head"] for n in before] == [True] and before[0]["cpu"] == 0

    sweep = {
        "name": "autoscale",
        "job": str(ROOT / "jobs" / "minrnn" / "stdlib-code.yaml"),
        "overrides": {"model.dim": 32, "model.depth": 1, "data.seq_len": 32, "data.max_bytes": 200000,
                      "train.steps": 6, "train.batch_size": 8, "train.log_every": 2, "train.eval_every": 0,
                      "train.checkpoint_every": 0, "train.warmup_steps": 0, "scaling.num_workers": 1,
                      "scaling.cpus_per_worker": 1, "tracking.experiment": "autoscale"},
        # Optuna's TPE picks the three learning rates (the optional search algorithm, for real).
        "tune": {"metric": "train/loss", "mode": "min", "num_samples": 3, "max_concurrent": 3, "search": "optuna",
                 "space": {"train.lr": {"loguniform": [1.0e-3, 3.0e-3]}}, "scheduler": {"type": "none"}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))

    seen: list[int] = []  # alive worker nodes, polled while the sweep runs
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                seen.append(sum(not n["head"] for n in alive_nodes(env)))
            except Exception:  # noqa: BLE001 -- a poll racing a node's start or exit; the next one counts
                pass
            stop.wait(1.0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        done = subprocess.run([str(BIN / "shipyard"), "sweep", str(path), "-q", "--address", f"127.0.0.1:{PORT}"],
                              env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
        poller.join(timeout=130)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert max(seen) == 2, seen  # scaled up, and never past the configured maximum

    mlflow = client(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("autoscale")
    runs = [r for r in mlflow.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    lrs = {float(r.data.params["train.lr"]) for r in runs}
    assert len(lrs) == 3 and all(1.0e-3 <= lr <= 3.0e-3 for lr in lrs), lrs
    head_id = before[0]["id"]
    for r in runs:  # every training worker ran on a node the autoscaler started
        workers = json.loads(r.data.tags["shipyard.workers"])
        assert workers and head_id not in workers.values(), workers
    # At most two trials trained at once (first to last logged step; the trials' MLflow runs
    # all open at once, since their drivers need no CPU): the third waited for a node instead of
    # failing.
    spans = []
    for r in runs:
        stamps = [m.timestamp for m in mlflow.get_metric_history(r.info.run_id, "train/loss")]
        assert len(stamps) == 3, stamps  # steps 2, 4, 6
        spans.append((min(stamps), max(stamps)))
    for t, _ in spans:
        assert sum(start <= t <= end for start, end in spans) <= 2, spans
    assert len({tuple(sorted(json.loads(r.data.tags["shipyard.workers"]).values())) for r in runs}) >= 2

    deadline = time.monotonic() + 150
    while (left := sum(not n["head"] for n in alive_nodes(env))) and time.monotonic() < deadline:
        time.sleep(3)
    assert left == 0, f"{left} idle worker node(s) still up 150 s after the sweep"
