"""A real sweep: Ray Tune over Shipyard runs (each trial a 2-worker Ray Train run), ASHA, MLflow.

Trials run one at a time over a grid of learning rates ordered best-first, so ASHA's decision is
forced and observable: the first trial sets each rung, and the later, much worse ones fall below
the rung's median at its first rung (step 4) and are stopped there, with fewer steps than the
survivor. MLflow must hold one parent run with a child run per trial, the sweep plot, the trial
table and the best trial's weights, registered under the job's name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shipyard.spec import SpecError
from shipyard.train.tracking import client
from shipyard.tune.spec import load_sweep
from shipyard.tune.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[2]


def write_sweep(tmp_path: Path, **tune) -> Path:
    sweep = {
        "name": "tiny-asha",
        "job": str(ROOT / "jobs" / "minrnn" / "stdlib-code.yaml"),
        "overrides": {"model.dim": 32, "model.depth": 1, "data.seq_len": 32, "data.max_bytes": 200000,
                      "train.steps": 12, "train.batch_size": 8, "train.log_every": 2, "train.eval_every": 4,
                      "train.eval_batches": 1, "train.checkpoint_every": 0, "train.warmup_steps": 0,
                      "tracking.experiment": "sweeps"},
        "tune": {"metric": "val/loss", "mode": "min", "num_samples": 1, "max_concurrent": 1,
                 "space": {"train.lr": {"grid": [3.0e-3, 1.0e-6, 1.0e-7, 1.0e-8]}},
                 "scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2}, **tune},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_asha_sweep_stops_bad_trials_and_tracks_parent_and_children(ray_cluster, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    seen: list[tuple[str, dict]] = []
    result = run_sweep(sweep, quiet=True, on_result=lambda trial, r: seen.append((trial, r)))
    assert not result.errors, result.errors
    by_lr = {o.params["train.lr"]: o for o in result.trials}
    assert set(by_lr) == {3.0e-3, 1.0e-6, 1.0e-7, 1.0e-8}
    assert by_lr[3.0e-3].status == "FINISHED" and by_lr[3.0e-3].step == 12
    for lr in (1.0e-6, 1.0e-7, 1.0e-8):
        assert by_lr[lr].status == "STOPPED_EARLY", by_lr[lr]
        assert by_lr[lr].step < 12
    assert result.best is by_lr[3.0e-3]
    assert seen and all("step" in r for _, r in seen)

    mlflow = client()
    parent = mlflow.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["shipyard.best_run"] == by_lr[3.0e-3].run_id
    artifacts = {a.path for a in mlflow.list_artifacts(result.run_id)}
    assert {"sweep.png", "trials.json", "best_model"} <= artifacts
    exp = mlflow.get_experiment_by_name("sweeps")
    children = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert {c.info.run_id for c in children} == {o.run_id for o in result.trials}
    status = {c.info.run_id: c.info.status for c in children}
    assert status[by_lr[3.0e-3].run_id] == "FINISHED"
    for lr in (1.0e-6, 1.0e-7, 1.0e-8):
        child = mlflow.get_run(by_lr[lr].run_id)
        assert child.info.status == "KILLED" and child.data.tags["shipyard.stopped_early"] == "asha"
        assert float(child.data.params["train.lr"]) == lr
    trials = json.loads(Path(mlflow.download_artifacts(result.run_id, "trials.json")).read_text())
    assert len(trials) == 4

    version = mlflow.get_model_version(sweep.job.name, result.registered_version)
    assert version.source == f"runs:/{result.run_id}/best_model"
    assert version.tags["shipyard.trial_run"] == by_lr[3.0e-3].run_id


@pytest.mark.slow
def test_pbt_clones_the_better_trial_from_its_checkpoint(ray_cluster, tmp_path):
    """Two trials, one with a learning rate that cannot learn: at PBT's decision (step 4; the
    run ends at 6) the bad one is in the bottom half and must clone the good one: a new run that
    starts from the good run's step-4 checkpoint (so its first logged step is 6), tagged with
    where it came from, that finishes the job. Synchronous PBT decides once both trials reached
    step 4, whichever started first (asynchronous PBT skips the decision when the other trial
    has no score yet, which made this test depend on start-up order)."""
    path = write_sweep(tmp_path, num_samples=1, max_concurrent=2,
                       space={"train.lr": {"grid": [3.0e-3, 1.0e-7]}},
                       scheduler={"type": "pbt", "perturbation_interval": 4, "quantile_fraction": 0.5,
                                  "resample_probability": 0.0, "synch": True})
    raw = yaml.safe_load(path.read_text())
    raw["name"] = "tiny-pbt"
    raw["overrides"].update({"train.steps": 6, "train.eval_every": 2, "train.checkpoint_every": 2,
                             "scaling.num_workers": 1, "checkpoint.keep": 0})
    path.write_text(yaml.safe_dump(raw))
    result = run_sweep(load_sweep(path), quiet=True)
    assert not result.errors, result.errors

    mlflow = client()
    exp = mlflow.get_experiment_by_name("sweeps")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    good = [r for r in runs if float(r.data.params["train.lr"]) == 3.0e-3
            and "shipyard.cloned_from" not in r.data.tags]
    clones = [r for r in runs if "shipyard.cloned_from" in r.data.tags]
    assert len(good) == 1 and clones, [(r.info.run_name, r.data.tags.get("shipyard.cloned_from")) for r in runs]
    for clone in clones:
        donor = mlflow.get_run(clone.data.tags["shipyard.cloned_from"])
        assert donor.data.tags["shipyard.trial"] != clone.data.tags["shipyard.trial"]
        steps = [m.step for m in mlflow.get_metric_history(clone.info.run_id, "train/loss")]
        assert steps and min(steps) > 4, steps  # continued from the donor's step-4 checkpoint
        # a list axis moves to a neighbouring value: the clone of lr 3e-3 runs with 1e-7 or 3e-3
        assert float(clone.data.params["train.lr"]) in (3.0e-3, 1.0e-7)
    assert all(o.status == "FINISHED" and o.step == 6 for o in result.trials), result.trials


def test_bad_sweep_specs_name_the_field(tmp_path):
    cases = {
        "train.lrr": ({"space": {"train.lrr": {"choice": [1.0e-3]}}}, "tune.space.train.lrr"),
        "dist": ({"space": {"train.lr": {"normal": [0, 1]}}}, "is not a distribution"),
        "bounds": ({"space": {"train.lr": {"loguniform": [0.0, 1.0]}}}, "low bound must be positive"),
        "value": ({"space": {"sharding.strategy": {"choice": ["ddp", "zero"]}}}, "'zero' does not make a valid job"),
        "metric": ({"metric": "loss"}, "tune.metric"),
        "pbt without checkpoints": ({"scheduler": {"type": "pbt"}}, "set train.checkpoint_every"),
        "pbt interval": ({"scheduler": {"type": "pbt", "perturbation_interval": 3}},
                         "tune.scheduler.perturbation_interval: 3 must be a multiple of train.checkpoint_every (4)"),
        "pbt mutate": ({"scheduler": {"type": "pbt", "mutate": ["model.dim"]}},
                       "tune.scheduler.mutate: 'model.dim' is not in tune.space"),
        "optuna grid": ({"search": "optuna"}, "cannot enumerate `grid` axes"),
        "mode": ({"mode": "lowest"}, "tune.mode"),
    }
    for name, (tune, expected) in cases.items():
        path = write_sweep(tmp_path, **tune)
        if name.startswith("pbt ") and name != "pbt without checkpoints":
            raw = yaml.safe_load(path.read_text())
            raw["overrides"]["train.checkpoint_every"] = 4
            path.write_text(yaml.safe_dump(raw))
        with pytest.raises(SpecError) as e:
            load_sweep(path)
        assert expected in str(e.value), (name, str(e.value))


@pytest.mark.slow
def test_ctrl_c_then_resume_reruns_no_finished_trial(tmp_path):
    """The CLI as a user runs it: Ctrl-C while the second of two trials runs, then
    `shipyard sweep --resume`: the finished trial is not run again, the interrupted one continues
    its own run from its last checkpoint (every step in MLflow exactly once), and the sweep ends
    with both trials finished under the same parent run."""
    home = tmp_path / "home"
    env = {**os.environ, "SHIPYARD_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    path = write_sweep(tmp_path, num_samples=1, max_concurrent=1, space={"train.steps": {"grid": [8, 160]}},
                       scheduler={"type": "none"})
    raw = yaml.safe_load(path.read_text())
    raw["overrides"].update({"train.checkpoint_every": 8, "train.eval_every": 8, "scaling.num_workers": 1,
                             "checkpoint.keep": 2})
    path.write_text(yaml.safe_dump(raw))
    shipyard = str(Path(sys.executable).with_name("shipyard"))
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([shipyard, "sweep", str(path), "-q"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    mlflow = client(f"sqlite:///{home / 'mlflow.db'}")
    deadline = time.monotonic() + 300
    try:
        while True:  # until the long trial has a checkpoint (step 8 or later)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            exp = mlflow.get_experiment_by_name("sweeps") if (home / "mlflow.db").exists() else None
            runs = mlflow.search_runs([exp.experiment_id], "params.`train.steps` = '160'") if exp else []
            if runs and any(m.step >= 10 for m in mlflow.get_metric_history(runs[0].info.run_id, "train/loss")):
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (state,) = (home / "sweeps").glob("*/shipyard-sweep.json")
    name = state.parent.name
    parent = json.loads(state.read_text())["parent_run_id"]
    assert mlflow.get_run(parent).info.status == "KILLED"
    exp = mlflow.get_experiment_by_name("sweeps")
    before = {r.data.params["train.steps"]: r for r in mlflow.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert before["8"].info.status == "FINISHED" and before["160"].info.status == "KILLED"

    done = subprocess.run([shipyard, "sweep", "--resume", name, "-q"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    after = {r.data.params["train.steps"]: r for r in mlflow.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(after) == {"8", "160"} and len(mlflow.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 2
    assert after["8"].info.run_id == before["8"].info.run_id
    assert after["8"].info.end_time == before["8"].info.end_time  # not run again
    assert after["160"].info.run_id == before["160"].info.run_id and after["160"].info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(after["160"].info.run_id, "train/loss")]
    assert steps == list(range(2, 161, 2)), steps[:10]
    assert mlflow.get_run(parent).info.status == "FINISHED"
