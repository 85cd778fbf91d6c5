"""MLflow tracking, done by the driver only: one MLflow run per job, never one per worker.

The default store is sqlite at `.shipyard/mlflow.db` (no server; concurrent writers would lock it,
which is why workers never write). Metrics arrive from rank 0 through the run's channel; a step
that is logged once is never logged again, so steps re-run after a restart from an older
checkpoint leave no duplicates.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # before mlflow reads it

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from shipyard.cluster import home
from shipyard.spec import JobSpec, flatten

TAG = "shipyard."


def tracking_uri(spec_uri: str | None) -> str:
    return spec_uri or f"sqlite:///{home() / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(uri))


class Tracker:
    """Owns the MLflow run of one job on the driver."""

    def __init__(self, spec: JobSpec, run_name: str, run_dir: str, run_id: str | None = None):
        self.client = client(spec.tracking.uri)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_step: dict[str, int] = {}
        if run_id is None:
            exp = self.client.get_experiment_by_name(spec.tracking.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                spec.tracking.experiment, artifact_location=_artifact_root(spec.tracking.uri, spec.tracking.experiment))
            tags = {"mlflow.runName": run_name, TAG + "family": spec.family,
                    TAG + "strategy": spec.sharding.strategy, TAG + "world_size": str(spec.scaling.num_workers),
                    TAG + "run_dir": run_dir, TAG + "job": spec.name, "mlflow.source.git.commit": _git_commit()}
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(k, _param(v)) for k, v in flatten(spec.to_dict()).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            for key in self.client.get_run(run_id).data.metrics:
                points = self.client.get_metric_history(run_id, key)
                self.history[key] = sorted((m.step, m.value) for m in points)
                self.last_step[key] = max(m.step for m in points)
        self.spec = spec
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spec.yaml"
            path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            self.client.log_artifact(self.run_id, str(path))

    def log(self, records: list[dict]) -> None:
        """Log metric records `{"step": s, name: value, ...}`; steps already logged are skipped."""
        now = int(time.time() * 1000)
        metrics = []
        for rec in records:
            step = rec.get("step")
            for k, v in rec.items():
                if not isinstance(v, (int, float)) or step <= self.last_step.get(k, -1):
                    continue
                self.last_step[k] = step
                self.history.setdefault(k, []).append((step, float(v)))
                metrics.append(Metric(k, float(v), now, step))
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, TAG + key, value)

    def finish(self, status: str, final: dict, plots=None) -> None:
        """Artifacts (final metrics JSON, loss curve, the family's plots) and the run's end state."""
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "final_metrics.json").write_text(json.dumps(final, indent=1, default=str))
            self.client.log_artifact(self.run_id, str(Path(tmp) / "final_metrics.json"))
            if self.history.get("train/loss"):
                png = Path(tmp) / "loss_curve.png"
                plot_losses(self.history, png, title=self.spec.name)
                self.client.log_artifact(self.run_id, str(png))
            if plots is not None and final:
                for png in plots(final, Path(tmp)):
                    self.client.log_artifact(self.run_id, str(png))
        self.client.set_terminated(self.run_id, status=status)


def plot_losses(history: dict[str, list[tuple[int, float]]], out: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in ("train/loss", "val/loss"):
        if history.get(key):
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if key.startswith("val") else None, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _artifact_root(uri: str | None, experiment: str) -> str | None:
    if uri is None:  # embedded store: artifacts beside the database, not in the working dir
        return (home() / "mlartifacts" / experiment).as_uri()
    return None  # a server decides


def _param(v) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s[:6000]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
