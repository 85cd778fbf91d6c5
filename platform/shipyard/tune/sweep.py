"""`shipyard sweep`: a Ray Tune experiment whose trials are Shipyard runs.

Each trial is a small driver function running in a Tune trial actor (a token 0.01 CPU of its own): it
builds the trial's job spec (the sweep's job with the sampled fields set) and calls `run_job`,
which starts that trial's own multi-worker Ray Train run with the job's sharding strategy. Every
metric record the trial's workers send is reported to Tune, so ASHA compares trials at the job's
own steps (`time_attr = "step"`) and stops the weak ones early. Trials beyond
`tune.max_concurrent`, or beyond what the cluster has free, wait in Tune's queue.

Tracking: one parent MLflow run per sweep (the tune settings as params; per trial the sampled
values and outcome; a plot of every swept value against the metric; the best trial's weights as
artifact `best_model/`, registered in the MLflow model registry under the job's name), and one
child run per trial (`mlflow.parentRunId`), which is the trial's ordinary Shipyard run. A trial
that ASHA stopped is marked KILLED with tag `shipyard.stopped_early`.

Ray 2.60 + Train V2 notes: Tune's dashboard-backed placement-group cleanup needs the dashboard
(ray#54305), which the embedded cluster runs; Ctrl-C stops the experiment with Tune's own state
saved under `.shipyard/sweeps/<sweep run>/`.
"""
from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from shipyard.cluster import connect, home
from shipyard.spec import flatten, parse_job
from shipyard.tune.spec import SweepSpec
from shipyard.train import checkpoint as ckpt
from shipyard.train.tracking import TAG, _artifact_root, client

SWEEP_TAG = TAG + "sweep"
TRIAL_DRIVER_CPUS = 0.01
"""A trial's own actor only drives its Train run (Tune refuses 0 resources); the run's workers
request their CPUs themselves, and `tune.max_concurrent` bounds the trials at once."""


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED | STOPPED_EARLY | FAILED | PENDING
    metric: float | None
    step: int
    run_id: str | None
    checkpoint: str | None


@dataclass
class SweepResult:
    run_id: str
    run_name: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    registered_version: str | None
    tracking_uri: str
    experiment_path: str
    errors: list[str] = field(default_factory=list)


def run_sweep(sweep: SweepSpec, *, address: str | None = None, quiet: bool = False,
              on_result: Callable[[str, dict], None] | None = None) -> SweepResult:
    """Run the sweep to its end; `on_result(trial_id, result)` sees every result Tune receives."""
    connect(address)
    job, t = sweep.job, sweep.tune
    mlflow = client(job.tracking.uri)
    run_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    exp = mlflow.get_experiment_by_name(job.tracking.experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        job.tracking.experiment, artifact_location=_artifact_root(job.tracking.uri, job.tracking.experiment))
    parent = mlflow.create_run(exp_id, run_name=run_name, tags={
        "mlflow.runName": run_name, SWEEP_TAG: sweep.name, TAG + "kind": "sweep", TAG + "job": job.name,
        TAG + "family": job.family})
    parent_id = parent.info.run_id
    params = {"job": str(sweep.job_path), **{f"tune.{k}": v for k, v in flatten(
        {"metric": t.metric, "mode": t.mode, "num_samples": t.num_samples, "max_concurrent": t.max_concurrent,
         "search": t.search, "scheduler": t.scheduler.__dict__, "time_budget_s": t.time_budget_s}).items()}}
    params.update({f"space.{k}": json.dumps(v) for k, v in t.space.items()})
    for k, v in params.items():
        mlflow.log_param(parent_id, k, str(v)[:6000])

    grace = t.scheduler.grace_period or job.train.eval_every or max(1, job.train.steps // 10)
    scheduler = None
    if t.scheduler.type == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            # max_t past the last step: ASHA stops trials only at its rungs, never at the very end
            # (a stop there would kill a finished trial before its final checkpoint is written).
            time_attr="step", max_t=job.train.steps + 1, grace_period=min(grace, job.train.steps),
            reduction_factor=t.scheduler.reduction_factor)
    table = _Table(sweep, quiet)
    storage = home() / "sweeps"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job_raw=sweep.job_raw, parent_id=parent_id, sweep_name=sweep.name,
                             run_prefix=run_name, metric=t.metric),
        {"CPU": TRIAL_DRIVER_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space=_param_space(t),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples,
            scheduler=scheduler,
            search_alg=tune.search.BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent),
            time_budget_s=t.time_budget_s),
        run_config=tune.RunConfig(name=run_name, storage_path=str(storage), verbose=0,
                                  callbacks=[_Follow(table, on_result)]),
    )
    errors: list[str] = []
    try:
        grid = tuner.fit()
    finally:
        table.close()
    outcomes = []
    for r in grid:
        cfg = {k: r.config[k] for k in t.space}
        last = r.metrics or {}
        step = int(last.get("step", 0))
        run_id = last.get("mlflow_run_id")
        status = "FAILED" if r.error else ("FINISHED" if step >= job.train.steps else "STOPPED_EARLY")
        if r.error:
            errors.append(f"trial {last.get('trial_id', '?')}: {str(r.error).splitlines()[0][:300]}")
        checkpoint = last.get("checkpoint") or _latest(last.get("run_dir"), job)
        outcomes.append(TrialOutcome(trial_id=last.get("trial_id", r.path.rsplit("/", 1)[-1]), params=cfg,
                                     status=status, metric=_metric_of(r, t.metric), step=step, run_id=run_id,
                                     checkpoint=checkpoint))
    for o in outcomes:  # the trial's own run could not close itself when Tune stopped it
        if o.run_id and o.status == "STOPPED_EARLY":
            mlflow.set_tag(o.run_id, TAG + "stopped_early", "asha")
            mlflow.set_terminated(o.run_id, status="KILLED")
    scored = [o for o in outcomes if o.metric is not None and o.status != "FAILED"]
    best = (min if t.mode == "min" else max)(scored, key=lambda o: o.metric) if scored else None
    version = None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
        mlflow.log_artifact(parent_id, str(Path(tmp) / "trials.json"))
        png = Path(tmp) / "sweep.png"
        if plot_sweep(outcomes, t.metric, png):
            mlflow.log_artifact(parent_id, str(png))
        if best is not None:
            mlflow.log_metric(parent_id, f"best/{t.metric}", best.metric)
            mlflow.set_tag(parent_id, TAG + "best_run", best.run_id or "")
            for k, v in best.params.items():
                mlflow.set_tag(parent_id, TAG + "best." + k, str(v))
            version = _register_best(mlflow, parent_id, best, job.name, Path(tmp), job)
    mlflow.set_terminated(parent_id, status="FAILED" if not scored else "FINISHED")
    table.final(outcomes, best)
    return SweepResult(run_id=parent_id, run_name=run_name, trials=outcomes, best=best,
                       registered_version=version, tracking_uri=mlflow.tracking_uri,
                       experiment_path=str(storage / run_name), errors=errors)


def _param_space(t) -> dict[str, Any]:
    space = {}
    for path, dist in t.space.items():
        kind, args = next(iter(dist.items()))
        space[path] = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
                       "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                       "randint": lambda a: tune.randint(*a)}[kind](args)
    return space


def _trial(config: dict, *, job_raw: dict, parent_id: str, sweep_name: str, run_prefix: str,
           metric: str) -> None:
    """One trial (in a Tune trial actor): the sampled job as an ordinary Shipyard run."""
    from shipyard.spec import apply_overrides
    from shipyard.train.launch import run_job
    import yaml
    from ray.train._internal.session import get_session
    trial_id = tune.get_context().get_trial_id()
    # Records arrive on run_job's follower thread, where `tune.report` blocks forever; the queue
    # that Ray's own TuneReportCallback uses (drained by the trial's session) works from any thread.
    to_tune = get_session()._get_or_create_inter_actor_queue()
    pairs = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in config.items()]
    spec = parse_job(apply_overrides(job_raw, pairs))
    run_name = f"{run_prefix}-{trial_id.rsplit('_', 1)[-1]}"
    state: dict[str, Any] = {"trial_id": trial_id}

    def report(record: dict) -> None:
        if record.get("event") == "run":
            state.update(mlflow_run_id=record["run_id"], run_dir=record["run_dir"])
        if record.get("event") == "worker" and record.get("placement_group"):
            state["placement_group"] = record["placement_group"]  # for the driver's clean-up
        if "event" in record:
            return
        state.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if metric in record:  # ASHA compares trials on reports that carry the metric
            to_tune.put(dict(state))

    result = run_job(spec, quiet=True, run_name=run_name, on_record=report,
                     tags={"mlflow.parentRunId": parent_id, SWEEP_TAG: sweep_name, TAG + "trial": trial_id})
    state.update(mlflow_run_id=result.run_id, checkpoint=result.checkpoint or "", status=result.status)
    if result.error is not None:
        raise RuntimeError(f"trial run {run_name} failed: {result.error}")
    tune.report(dict(state))


def _latest(run_dir: str | None, job) -> str | None:
    """The newest complete checkpoint of a trial's run (a stopped trial may have one)."""
    if not run_dir:
        return None
    from shipyard.train.storage import filesystem
    fs, path = filesystem(run_dir, job.storage)
    found = ckpt.latest_complete(fs, path)
    return ("s3://" + found if found and run_dir.startswith("s3://") else found) or None


def _metric_of(result, metric: str) -> float | None:
    v = (result.metrics or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def _register_best(mlflow, parent_id: str, best: TrialOutcome, name: str, tmp: Path, job) -> str | None:
    """The best trial's consolidated weights as the parent's `best_model/` artifact, registered
    under the job's name (source `runs:/<parent>/best_model`)."""
    if not best.checkpoint:
        return None
    from shipyard.export import local_checkpoint
    from shipyard.spec import StorageSpec
    out = tmp / "best_model"
    out.mkdir()
    with local_checkpoint(best.checkpoint, job.storage if job.storage else StorageSpec()) as d:
        for fname in (ckpt.WEIGHTS, ckpt.META):
            (out / fname).write_bytes((Path(d) / fname).read_bytes())
    mlflow.log_artifacts(parent_id, str(out), artifact_path="best_model")
    from mlflow.exceptions import MlflowException
    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        mlflow.create_registered_model(name, description=f"Shipyard job {name}: best trial of its sweeps")
    version = mlflow.create_model_version(
        name, source=f"runs:/{parent_id}/best_model", run_id=parent_id,
        tags={"shipyard.trial_run": best.run_id or "", "shipyard.checkpoint": best.checkpoint,
              **{f"param.{k}": str(v) for k, v in best.params.items()}})
    return version.version


def plot_sweep(outcomes: list[TrialOutcome], metric: str, out: Path) -> bool:
    """One panel per swept field: its value against the trial's last metric, by outcome."""
    scored = [o for o in outcomes if o.metric is not None]
    if not scored:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(scored[0].params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), dpi=110, squeeze=False)
    colors = {"FINISHED": "tab:blue", "STOPPED_EARLY": "tab:orange", "FAILED": "tab:red"}
    for ax, key in zip(axes[0], keys):
        for status, color in colors.items():
            pts = [(o.params[key], o.metric) for o in scored if o.status == status]
            if pts and all(isinstance(x, (int, float)) for x, _ in pts):
                ax.scatter(*zip(*pts), c=color, label=status.lower().replace("_", " "), s=28)
            elif pts:
                xs = [str(x) for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], c=color, label=status.lower().replace("_", " "), s=28)
        if all(isinstance(o.params[key], float) for o in scored) and min(o.params[key] for o in scored) > 0 \
                and max(o.params[key] for o in scored) / min(o.params[key] for o in scored) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (last report)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


class _Follow(tune.Callback):
    """Feeds the live table. Tune pickles its run config into the experiment state; the table
    (terminal state, locks) stays behind, so a restored copy is inert."""

    def __init__(self, table: "_Table", on_result):
        self.table, self.on_result = table, on_result

    def __getstate__(self):
        return {"table": None, "on_result": None}

    def _update(self, trials):
        if self.table is not None:
            self.table.update(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.on_result:
            self.on_result(trial.trial_id, result)
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)
        self._update(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)
        self._update(trials)

    @staticmethod
    def _release(trial) -> None:
        """A trial that Tune stops (ASHA, or at max_t) is killed mid-run, and its Train run's
        worker placement group would outlive it (see launch._release_placement_groups): remove
        it from here once the trial is gone."""
        import threading
        from shipyard.train.launch import _release_placement_groups
        group = (trial.last_result or {}).get("placement_group")
        if group:
            threading.Thread(target=_release_placement_groups, args=({group}, 5.0), daemon=True).start()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials)


class _Table:
    """The live table of trials: status, sampled values, step, latest metric, best so far."""

    def __init__(self, sweep: SweepSpec, quiet: bool):
        from rich.console import Console
        from rich.live import Live
        self.sweep, self.quiet = sweep, quiet
        self.console = Console(stderr=True)
        self.live = None if quiet or not self.console.is_terminal else Live(console=self.console, refresh_per_second=2)
        if self.live:
            self.live.start()
        self.printed = 0.0

    def _render(self, rows):
        from rich.table import Table
        t = self.sweep.tune
        table = Table(title=f"sweep {self.sweep.name}: {t.metric} ({t.mode})")
        for col in ("trial", "status", *t.space, "step", t.metric):
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        return table

    def _rows(self, trials):
        t = self.sweep.tune
        rows, best = [], None
        for tr in trials:
            res = tr.last_result or {}
            value = res.get(t.metric)
            if isinstance(value, (int, float)) and (best is None or (value < best if t.mode == "min" else value > best)):
                best = value
            rows.append([tr.trial_id, tr.status, *[_fmt(tr.config.get(k)) for k in t.space],
                         str(res.get("step", "")), _fmt(value)])
        return rows, best

    def update(self, trials) -> None:
        if self.quiet:
            return
        rows, best = self._rows(trials)
        table = self._render(rows)
        table.caption = f"best so far: {_fmt(best)}"
        if self.live:
            self.live.update(table)
        elif time.monotonic() - self.printed > 15:
            self.printed = time.monotonic()
            self.console.print(table)

    def close(self) -> None:
        if self.live:
            self.live.stop()

    def final(self, outcomes: list[TrialOutcome], best: TrialOutcome | None) -> None:
        if self.quiet:
            return
        rows = [[o.trial_id, o.status, *[_fmt(o.params.get(k)) for k in self.sweep.tune.space], str(o.step),
                 _fmt(o.metric)] for o in outcomes]
        table = self._render(rows)
        table.caption = f"best: {best.trial_id} {_fmt(best.metric)}" if best else "no trial reported the metric"
        self.console.print(table)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
