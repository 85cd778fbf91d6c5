"""The `laplace:` stage through the platform: a tiny digits run on real Ray (`shipyard run`, which
runs the stage after training as the job asks, on the run by id), then `shipyard laplace` again
on its checkpoint directory; each stage is a child run in the source run's MLflow
experiment (real sqlite store) with the metrics and a reliability-diagram PNG. Bad input is refused
naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.cli import main
from shipyard.spec import SpecError, parse_job
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[3] / "jobs" / "laplace" / "digits.yaml"
TINY = ["model.hidden=32", "train.steps=60", "train.log_every=20", "train.eval_every=60",
        "train.checkpoint_every=0", "tracking.experiment=laplace-stage-test", "laplace.methods=[icla,kfac]"]


def _children(mlflow, parent_id):
    exp = mlflow.get_experiment_by_name("laplace-stage-test")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])
    return exp, runs


@pytest.mark.slow
def test_laplace_stage_logs_child_runs_with_metrics_and_reliability_diagram(ray_cluster, capsys):
    assert main(["run", str(JOB), *TINY, "-q"]) == 0
    mlflow = client()
    exp = mlflow.get_experiment_by_name("laplace-stage-test")
    source = [r for r in mlflow.search_runs([exp.experiment_id]) if "shipyard.stage" not in r.data.tags]
    assert len(source) == 1 and source[0].info.status == "FINISHED"
    source = source[0]
    _, after_training = _children(mlflow, source.info.run_id)
    assert len(after_training) == 1  # the job's `laplace.after_training: true`

    checkpoint = source.data.tags["shipyard.checkpoint"]
    assert main(["laplace", checkpoint, "laplace.icla_prior=kfac"]) == 0
    assert "auroc/near" in capsys.readouterr().out
    _, children = _children(mlflow, source.info.run_id)  # found from the checkpoint's run directory
    assert len(children) == 2
    for child in children:
        assert child.info.experiment_id == exp.experiment_id and child.info.status == "FINISHED"
        assert child.data.tags["shipyard.stage"] == "laplace"
        assert child.data.tags["shipyard.checkpoint"] == checkpoint
        m = child.data.metrics
        for method in ("map", "icla", "kfac"):
            for key in ("accuracy", "nll", "ece", "auroc/near", "fpr95/noise", "auroc/rotated"):
                assert f"laplace/{method}/{key}" in m, (method, key)
        assert m["laplace/icla/fit_s"] > 0 and "laplace/diag/nll" not in m
        assert m["laplace/map/accuracy"] > 0.8  # 60 steps on digits 0-4
        artifacts = {a.path for a in mlflow.list_artifacts(child.info.run_id)}
        assert {"reliability.png", "laplace.json", "spec.yaml"} <= artifacts
        png = Path(mlflow.download_artifacts(child.info.run_id, "reliability.png")).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert child.data.params["laplace.methods"] == '["icla", "kfac"]'
    # The borrowed ICLA variant takes KFAC's marginal-likelihood precision; the free one its own.
    # The borrowed ICLA variant takes KFAC's prior precision (marginal likelihood); the
    # curvature-free one tunes its own.
    borrowed, free = children[1].data.metrics, children[0].data.metrics
    assert borrowed["laplace/icla/prior_precision"] == borrowed["laplace/kfac/prior_precision"]
    assert free["laplace/icla/prior_precision"] != free["laplace/kfac/prior_precision"]

    # Bad input: an unknown method, a non-laplace override (exit 2, the field named).
    assert main(["laplace", checkpoint, "laplace.methods=[icla,swag]"]) == 2
    assert "laplace.methods[1]" in " ".join(capsys.readouterr().err.split())
    assert main(["laplace", checkpoint, "train.steps=3"]) == 2
    assert "only laplace.* overrides" in " ".join(capsys.readouterr().err.split())


def test_laplace_block_is_refused_for_a_family_without_the_stage_and_left_out_when_unused():
    raw = {"name": "x", "model": {"family": "minrnn"}, "data": {}, "laplace": {"after_training": True}}
    with pytest.raises(SpecError, match="laplace: family 'minrnn' has no Laplace stage; families with one: laplace"):
        parse_job(raw)
    spec = parse_job({"name": "x", "model": {"family": "minrnn"}, "data": {}})
    assert "laplace" not in spec.to_dict()  # existing jobs' params and spec.yaml are unchanged
    with pytest.raises(SpecError, match="laplace.predictive"):
        parse_job({"name": "x", "model": {"family": "laplace"}, "laplace": {"predictive": "exact"}})
