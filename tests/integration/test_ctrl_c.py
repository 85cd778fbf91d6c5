"""Ctrl-C in the terminal stops a run cleanly: workers write a checkpoint, the run can be resumed.

A real `shipyard run` process in its own process group gets SIGINT sent to the whole group, as a
terminal does on Ctrl-C (Ray's own processes are in that group too).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shipyard.train import checkpoint as ckpt
from shipyard.train.storage import filesystem
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
STEPS = 100000  # far more than can run before the interrupt


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_marks_the_run_resumable(shipyard_home, tmp_path):
    exe = Path(sys.executable).with_name("shipyard")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [str(exe), "run", str(JOB), "model.dim=32", "model.depth=1", "data.seq_len=32",
         "data.max_bytes=200000", f"train.steps={STEPS}", "train.batch_size=8", "train.log_every=1",
         "train.checkpoint_every=0", "tracking.experiment=ctrl-c", "-q"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})
    mlflow = client()
    run = None
    deadline = time.time() + 180
    while run is None or run.data.metrics.get("step", 0) < 3:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.time() < deadline, "the run never reported progress"
        time.sleep(1)
        exp = mlflow.get_experiment_by_name("ctrl-c")
        runs = mlflow.search_runs([exp.experiment_id]) if exp else []
        run = runs[0] if runs else None
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    output = (tmp_path / "run.log").read_text()
    assert "continue it: shipyard resume" in output

    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    fs, path = filesystem(run.data.tags["shipyard.checkpoint"])
    manifest = ckpt.read_manifest(fs, path)
    assert manifest is not None and 3 <= manifest["step"] < STEPS
    assert manifest["step"] == run.data.metrics["step"]  # stopped right after the last logged step
