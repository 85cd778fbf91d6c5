"""The `laplace:` stage: a last-layer Laplace approximation fitted on a finished checkpoint.

    shipyard laplace RUN_OR_CHECKPOINT [laplace.methods=[icla,kfac] ...]

The target is found as `shipyard report` / `export` find one (a checkpoint or run directory, or an
MLflow run by id, prefix or name). Its settings are the checkpoint spec's `laplace:` block with the
overrides applied. The fit runs as one Ray task (it reads the checkpoint where it runs, so an
`s3://` checkpoint is fine); the driver logs a new MLflow run, `<source run>-laplace`, in the
source run's experiment, as a child of the source run (`mlflow.parentRunId`): per method
`laplace/<method>/{accuracy,nll,ece,auroc/<ood set>,fpr95/<ood set>,fit_s,prior_precision}` at the
checkpoint's step, a reliability diagram (`reliability.png`) and every number in `laplace.json`.

Which families have the stage: `TASKS`, one explicit dict from family name to the function that
returns the splits (train, val, test and the OOD sets) for a checkpoint's spec; the model must
expose `features(x)` and a `head` linear layer.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shipyard_models import laplace as digits_laplace
from shipyard_models.laplace import LaplaceConfig, MethodResult, Splits

TASKS: dict[str, Callable[[object, object], Splits]] = {
    digits_laplace.FAMILY.name: digits_laplace.splits,
}

STAGE = "laplace"


@dataclass
class LaplaceRun:
    run_id: str
    run_name: str
    experiment_id: str
    checkpoint: str
    metrics: dict[str, float]
    tracking_uri: str


def run_laplace(target: str, overrides: list[str] | tuple[str, ...] = (), *, tracking_uri: str | None = None,
                address: str | None = None) -> LaplaceRun:
    """Fit and score the checkpoint `target` names; returns the new MLflow run."""
    from shipyard.cluster import connect
    from shipyard.export import local_checkpoint, resolve_checkpoint
    from shipyard.spec import SpecError, parse_job
    from shipyard.train import checkpoint as ckpt
    from shipyard.train.tracking import Tracker, client

    uri, storage = resolve_checkpoint(target, tracking_uri)
    with local_checkpoint(uri, storage) as directory:
        meta = ckpt.read_meta(directory)
    bad = [o for o in overrides if not o.startswith("laplace.")]
    if bad:
        raise SpecError(f"  {', '.join(bad)}: `shipyard laplace` takes only laplace.* overrides")
    spec = parse_job(meta.spec, list(overrides))
    if spec.family not in TASKS:
        raise SpecError(f"  model.family: {spec.family!r} has no Laplace stage; families with one: "
                        f"{', '.join(TASKS)}")
    if tracking_uri:
        spec = dataclasses.replace(spec, tracking=dataclasses.replace(spec.tracking, uri=tracking_uri))
    mlflow = client(spec.tracking.uri)
    source = _source_run(mlflow, target, uri)
    cfg = LaplaceConfig(**{k: tuple(v) if k == "methods" else v
                           for k, v in dataclasses.asdict(spec.laplace).items() if k != "after_training"})

    import ray
    connect(address)
    storage_dict = dataclasses.asdict(storage) if storage is not None else None
    fit = ray.remote(num_cpus=1)(_fit)
    results = ray.get(fit.remote(uri, storage_dict, spec.to_dict(secrets=True), cfg))

    name = f"{source.info.run_name if source else spec.name}-{STAGE}"
    tags = {"shipyard.stage": STAGE, "shipyard.checkpoint": uri}
    if source is not None:
        tags.update({"mlflow.parentRunId": source.info.run_id, "shipyard.source_run": source.info.run_id})
        exp = mlflow.get_experiment(source.info.experiment_id)
        spec = dataclasses.replace(spec, tracking=dataclasses.replace(spec.tracking, experiment=exp.name))
    tracker = Tracker(spec, name, uri, tags=tags)
    from mlflow.entities import Param
    logged = mlflow.get_run(tracker.run_id).data.params  # the laplace block only when not the default
    mlflow.log_batch(tracker.run_id, params=[
        Param(f"{STAGE}.{k}", json.dumps(v) if isinstance(v, list) else str(v))
        for k, v in dataclasses.asdict(spec.laplace).items() if f"{STAGE}.{k}" not in logged])
    flat = {f"{STAGE}/{method}/{k}": v for method, r in results.items() for k, v in r.metrics.items()}
    tracker.log([{"step": meta.step, **flat}])

    def plots(final, out: Path) -> list[Path]:
        (out / "laplace.json").write_text(json.dumps(
            {m: {"metrics": r.metrics, "reliability": r.reliability} for m, r in results.items()}, indent=1))
        reliability_diagram(results, out / "reliability.png", title=f"{name} (step {meta.step})")
        return [out / "laplace.json", out / "reliability.png"]

    tracker.finish("FINISHED", flat, plots=plots)
    run = mlflow.get_run(tracker.run_id)
    return LaplaceRun(tracker.run_id, name, run.info.experiment_id, uri, flat, mlflow.tracking_uri)


def _fit(uri: str, storage: dict | None, spec_dict: dict, cfg: LaplaceConfig) -> dict[str, MethodResult]:
    """The Ray task: load the checkpoint where the task runs, fit and score every method."""
    import torch
    from shipyard.export import load_model, local_checkpoint
    from shipyard.spec import StorageSpec, parse_job
    torch.set_num_threads(1)
    spec = parse_job(spec_dict)
    with local_checkpoint(uri, StorageSpec(**storage) if storage else None) as directory:
        model, _, _ = load_model(directory)
    splits = TASKS[spec.family](spec.model, spec.data)
    return digits_laplace.posthoc.run(model, splits, cfg)


def _source_run(mlflow, target: str, checkpoint: str):
    """The MLflow run the checkpoint came from: `target` itself if it names a run, else the run whose
    directory holds the checkpoint; None when it is not in this tracking store."""
    from shipyard.cli import find_run
    if not (target.startswith("s3://") or Path(target).is_dir()):
        return find_run(mlflow, target)
    run_dir = checkpoint.rsplit("/", 1)[0]
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    found = mlflow.search_runs(exps, filter_string=f"tags.`shipyard.run_dir` = '{run_dir}'", max_results=1,
                               order_by=["attributes.start_time ASC"]) if exps else []
    return found[0] if found else None


def reliability_diagram(results: dict[str, MethodResult], out: Path, title: str = "") -> None:
    """Accuracy against confidence per bin, one line per method, the diagonal for reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for method, r in results.items():
        rel = r.reliability
        ax.plot(rel["confidence"], rel["accuracy"], marker="o", ms=3,
                label=f"{method} (ECE {r.metrics['ece']:.3f})")
    ax.set_xlabel("confidence (max predictive probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
