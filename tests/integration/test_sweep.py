"""A real sweep: Ray Tune over Shipyard runs (each trial a 2-worker Ray Train run), ASHA, MLflow.

Trials run one at a time over a grid of learning rates ordered best-first, so ASHA's decision is
forced and observable: the first trial sets each rung, and the later, much worse ones fall below
the rung's median at its first rung (step 4) and are stopped there, with fewer steps than the
survivor. MLflow must hold one parent run with a child run per trial, the sweep plot, the trial
table and the best trial's weights, registered under the job's name.
"""
from __future__ import annotations

import json
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
                 "space": {"train.lr": {"grid": [3.0e-3, 1.0e-6, 1.0e-7]}},
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
    assert set(by_lr) == {3.0e-3, 1.0e-6, 1.0e-7}
    assert by_lr[3.0e-3].status == "FINISHED" and by_lr[3.0e-3].step == 12
    for lr in (1.0e-6, 1.0e-7):
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
    for lr in (1.0e-6, 1.0e-7):
        child = mlflow.get_run(by_lr[lr].run_id)
        assert child.info.status == "KILLED" and child.data.tags["shipyard.stopped_early"] == "asha"
        assert float(child.data.params["train.lr"]) == lr
    trials = json.loads(Path(mlflow.download_artifacts(result.run_id, "trials.json")).read_text())
    assert len(trials) == 3

    version = mlflow.get_model_version(sweep.job.name, result.registered_version)
    assert version.source == f"runs:/{result.run_id}/best_model"
    assert version.tags["shipyard.trial_run"] == by_lr[3.0e-3].run_id


def test_bad_sweep_specs_name_the_field(tmp_path):
    cases = {
        "train.lrr": ({"space": {"train.lrr": {"choice": [1.0e-3]}}}, "tune.space.train.lrr"),
        "dist": ({"space": {"train.lr": {"normal": [0, 1]}}}, "is not a distribution"),
        "bounds": ({"space": {"train.lr": {"loguniform": [0.0, 1.0]}}}, "low bound must be positive"),
        "value": ({"space": {"sharding.strategy": {"choice": ["ddp", "zero"]}}}, "'zero' does not make a valid job"),
        "metric": ({"metric": "loss"}, "tune.metric"),
        "pbt": ({"scheduler": {"type": "pbt"}}, "not implemented yet"),
        "mode": ({"mode": "lowest"}, "tune.mode"),
    }
    for name, (tune, expected) in cases.items():
        path = write_sweep(tmp_path, **tune)
        with pytest.raises(SpecError) as e:
            load_sweep(path)
        assert expected in str(e.value), (name, str(e.value))
