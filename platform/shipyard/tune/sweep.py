"""`shipyard sweep`: a Ray Tune experiment whose trials are Shipyard runs.

Each trial is a small driver function running in a Tune trial actor (on the head node, no CPU): it
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

PBT: a trial reports a Tune checkpoint with every Shipyard checkpoint its run writes; that Tune
checkpoint is only a pointer file (`POINTER`: trial, run, checkpoint path). A trial that PBT makes
clone a better one restarts with the better one's pointer and starts a new run from that checkpoint
(weights, optimizer, step and data position) with its own, perturbed hyperparameters.

Ctrl-C: Tune saves its experiment state under `.shipyard/sweeps/<sweep run>/` (with our
`STATE_FILE`); `run_sweep(..., resume=<sweep run>)` restores it: finished trials stay finished and
every unfinished trial restarts with its own pointer, i.e. continues its own run (same MLflow run)
from that run's newest complete checkpoint.

Ray 2.60 + Train V2 notes: Tune's dashboard-backed placement-group cleanup needs the dashboard
(ray#54305), which the embedded cluster runs, and placement groups of trials Tune kills are removed
here as well (`_Follow`).
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
TRIAL_DRIVER = {"CPU": 0, "node:__internal_head__": 0.01}
"""A trial's own actor only drives its Train run, so it takes no CPU and runs on the head node
(every Ray cluster's head carries this resource): a fraction of a CPU on a worker node would keep
a whole-CPU training worker from fitting there, and on an autoscaling cluster whose head has no
CPUs (the usual KubeRay set-up) trials could then wait forever. The run's workers request their
CPUs themselves; `tune.max_concurrent` bounds the trials at once."""


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED | STOPPED_EARLY | FAILED | INTERRUPTED
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
    interrupted: bool = False


STATE_FILE = "shipyard-sweep.json"
"""Next to Tune's own experiment state: what `shipyard sweep --resume` needs to carry on."""

_LIVE: dict[str, Any] = {"table": None, "on_result": None}
"""The running sweep's live table and result hook. Tune pickles its callbacks into the experiment
state; the restored `_Follow` of a resumed sweep finds the new ones here."""


def run_sweep(sweep: SweepSpec | None, *, address: str | None = None, quiet: bool = False,
              on_result: Callable[[str, dict], None] | None = None,
              resume: str | None = None) -> SweepResult:
    """Run the sweep to its end; `on_result(trial_id, result)` sees every result Tune receives.

    `resume` is the name of an interrupted sweep (`sweep` may then be None): Tune restores its
    experiment state, finished trials stay as they are, and unfinished ones continue from their
    last checkpoint in their own runs. A Ctrl-C returns a result with `interrupted` set."""
    connect(address)
    storage = home() / "sweeps"
    if resume:
        saved = load_state(resume)
        if sweep is None:
            from shipyard.tune.spec import load_sweep
            sweep = load_sweep(saved["sweep_file"], saved["overrides"])
    job, t = sweep.job, sweep.tune
    mlflow = client(job.tracking.uri)
    if resume:
        run_name, parent_id = resume, saved["parent_run_id"]
        mlflow.update_run(parent_id, status="RUNNING")
        # Trials the interruption left half-way are continued (with a checkpoint) or restarted
        # (without one) by Tune; the MLflow runs of the latter would otherwise stay RUNNING.
        for child in mlflow.search_runs([mlflow.get_run(parent_id).info.experiment_id],
                                        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                                      "and attributes.status = 'RUNNING'"):
            mlflow.set_terminated(child.info.run_id, status="KILLED")
    else:
        run_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        parent_id = _start_parent(mlflow, sweep, run_name)
        (storage / run_name).mkdir(parents=True, exist_ok=True)
        (storage / run_name / STATE_FILE).write_text(json.dumps({
            "sweep_file": str(sweep.path), "overrides": list(sweep.overrides), "parent_run_id": parent_id,
            "tracking_uri": mlflow.tracking_uri}, indent=1))

    table = _Table(sweep, quiet)
    if not quiet:
        table.console.print(f"sweep run {run_name} (MLflow parent run {parent_id})"
                            + (": resumed" if resume else ""), highlight=False)
    _LIVE.update(table=table, on_result=on_result)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job_raw=sweep.job_raw, parent_id=parent_id, sweep_name=sweep.name,
                             run_prefix=run_name, metric=t.metric),
        TRIAL_DRIVER)
    if resume:
        tuner = tune.Tuner.restore(str(storage / run_name), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(t),
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=_scheduler(sweep),
                search_alg=_search(t), time_budget_s=t.time_budget_s,
                # a reused trial actor would keep the stopped trial's run_job thread alive
                reuse_actors=False),
            run_config=tune.RunConfig(name=run_name, storage_path=str(storage), verbose=0,
                                      callbacks=[_Follow()]),
        )
    errors: list[str] = []
    sigint = _SigintWatch()
    try:
        grid = tuner.fit()
    finally:
        table.close()
        _LIVE.update(table=None, on_result=None)
    interrupted = sigint.interrupted()
    trials = {tr.trial_id: tr for tr in grid._experiment_analysis.trials}
    outcomes = []
    for r in grid:
        cfg = {k: r.config[k] for k in t.space}
        last = r.metrics or {}
        step = int(last.get("step", 0))
        run_id = last.get("mlflow_run_id")
        trial_id = last.get("trial_id", r.path.rsplit("/", 1)[-1])
        tr = trials.get(trial_id)
        if r.error:
            status = "FAILED"
            errors.append(f"trial {trial_id}: {str(r.error).splitlines()[0][:300]}")
        elif interrupted and (tr is None or tr.status != "TERMINATED" or last.get("status") != "FINISHED"):
            status = "INTERRUPTED"
        else:
            steps = int(r.config.get("train.steps", job.train.steps))  # the trial's own length
            status = "FINISHED" if last.get("status") == "FINISHED" or step >= steps else "STOPPED_EARLY"
        checkpoint = last.get("checkpoint") or _latest(last.get("run_dir"), job)
        outcomes.append(TrialOutcome(trial_id=trial_id, params=cfg, status=status,
                                     metric=_metric_of(r, t.metric), step=step, run_id=run_id,
                                     checkpoint=checkpoint))
    for o in outcomes:  # the trial's own run could not close itself when Tune stopped it
        if o.run_id and o.status in ("STOPPED_EARLY", "INTERRUPTED"):
            if o.status == "STOPPED_EARLY":
                mlflow.set_tag(o.run_id, TAG + "stopped_early", t.scheduler.type)
            mlflow.set_terminated(o.run_id, status="KILLED")
    if interrupted:
        mlflow.set_terminated(parent_id, status="KILLED")
        table.final(outcomes, None, interrupted=run_name)
        return SweepResult(run_id=parent_id, run_name=run_name, trials=outcomes, best=None,
                           registered_version=None, tracking_uri=mlflow.tracking_uri,
                           experiment_path=str(storage / run_name), errors=errors, interrupted=True)
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


class _SigintWatch:
    """Did Tune stop the experiment on a Ctrl-C (SIGINT)? Tune keeps the handler it finds, installs
    its own for the run and, on the first SIGINT, saves its experiment state, ends the run and puts
    the one it found back, without telling its caller. So one of ours goes in first; finding it
    back in place after `fit` means Tune was interrupted (a second Ctrl-C then reaches it and
    aborts at once)."""

    def __init__(self):
        import signal
        import threading
        self.handler = None
        if threading.current_thread() is threading.main_thread():
            def abort(signum, frame):
                raise KeyboardInterrupt
            self.handler = abort
            self.previous = signal.signal(signal.SIGINT, abort)

    def interrupted(self) -> bool:
        import signal
        if self.handler is None:
            return False
        found = signal.getsignal(signal.SIGINT) is self.handler
        signal.signal(signal.SIGINT, self.previous)
        return found


def load_state(run_name: str) -> dict:
    """The saved settings of sweep `run_name`, with a clear error when there is nothing to resume."""
    path = home() / "sweeps" / run_name / STATE_FILE
    if not path.exists():
        known = sorted(p.parent.name for p in (home() / "sweeps").glob(f"*/{STATE_FILE}"))
        raise ValueError(f"--resume: no sweep named {run_name!r} under {home() / 'sweeps'}"
                         + (f"; known: {', '.join(known[-10:])}" if known else ""))
    return json.loads(path.read_text())


def _start_parent(mlflow, sweep: SweepSpec, run_name: str) -> str:
    job, t = sweep.job, sweep.tune
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
    return parent_id


def _scheduler(sweep: SweepSpec):
    job, t = sweep.job, sweep.tune
    s = t.scheduler
    if s.type == "asha":
        grace = s.grace_period or job.train.eval_every or max(1, job.train.steps // 10)
        return tune.schedulers.ASHAScheduler(
            # max_t past the last step: ASHA stops trials only at its rungs, never at the very end
            # (a stop there would kill a finished trial before its final checkpoint is written).
            time_attr="step", max_t=job.train.steps + 1, grace_period=min(grace, job.train.steps),
            reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        mutate = s.mutate or list(t.space)
        return tune.schedulers.PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval or job.train.checkpoint_every,
            hyperparam_mutations={p: _mutation(t.space[p]) for p in mutate},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability, synch=s.synch)
    return None


def _mutation(dist: dict):
    """PBT's view of a distribution: lists shift to a neighbouring value, ranges scale by 0.8/1.2."""
    kind, args = next(iter(dist.items()))
    return list(args) if kind in ("choice", "grid") else _param_space_one(kind, args)


def _search(t):
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        import optuna
        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=t.seed)),
                                  max_concurrent=t.max_concurrent)
    return tune.search.BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent)


def _param_space(t) -> dict[str, Any]:
    return {path: _param_space_one(*next(iter(dist.items()))) for path, dist in t.space.items()}


def _param_space_one(kind: str, args: list):
    return {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}[kind](args)


POINTER = "shipyard-trial.json"
"""A trial's Tune checkpoint is this one small file: which Shipyard run and checkpoint the trial had
reached. The weights stay where the run wrote them (local disk or S3); Tune copies only the pointer."""


def _trial(config: dict, *, job_raw: dict, parent_id: str, sweep_name: str, run_prefix: str,
           metric: str) -> None:
    """One trial (in a Tune trial actor): the sampled job as an ordinary Shipyard run.

    A trial restarted with its own pointer (`shipyard sweep --resume`, or Tune pausing it)
    continues its own run; one restarted with another trial's pointer (PBT's exploit) starts a
    new run from that trial's checkpoint with its own, perturbed hyperparameters."""
    import queue
    import threading
    from shipyard.spec import apply_overrides
    from shipyard.train.launch import run_job
    import yaml
    trial_id = tune.get_context().get_trial_id()
    pairs = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in config.items()]
    spec = parse_job(apply_overrides(job_raw, pairs))
    origin = _read_pointer(tune.get_checkpoint())
    tags = {"mlflow.parentRunId": parent_id, SWEEP_TAG: sweep_name, TAG + "trial": trial_id}
    resume = start_from = None
    run_name = f"{run_prefix}-{trial_id.rsplit('_', 1)[-1]}"
    if origin and origin["trial_id"] == trial_id:
        resume = (origin["run_id"], origin["run_name"])
    elif origin:
        start_from = origin["checkpoint"]
        run_name = f"{run_name}-from-{origin['trial_id'].rsplit('_', 1)[-1]}-{origin['step']}"
        tags[TAG + "cloned_from"] = origin["run_id"]

    # run_job runs in a thread and its records come back here: `tune.report` must be called from
    # the trial's own thread (it blocks forever on run_job's follower thread).
    records: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = run_job(spec, quiet=True, run_name=run_name, on_record=records.put,
                                        tags=tags, resume=resume, start_from=start_from)
        except BaseException as e:  # noqa: BLE001 -- handed to the trial's thread below
            outcome["error"] = e
        finally:
            records.put(None)

    threading.Thread(target=work, name="shipyard-trial-run", daemon=True).start()
    state: dict[str, Any] = {"trial_id": trial_id}
    every, total = spec.train.checkpoint_every, spec.train.steps
    held: dict | None = None  # a metric report waiting for its step's checkpoint

    def report_with_pointer(metrics: dict, path: str, step: int) -> None:
        # tune.report persists the checkpoint to the trial's storage before it returns, so the
        # local pointer directory can go right after
        with tempfile.TemporaryDirectory(prefix="shipyard-trial-") as d:
            (Path(d) / POINTER).write_text(json.dumps({
                "trial_id": trial_id, "run_id": state.get("mlflow_run_id"),
                "run_name": state.get("run_name"), "checkpoint": path, "step": step}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    while (record := records.get()) is not None:
        event = record.get("event")
        if event == "run":
            state.update(mlflow_run_id=record["run_id"], run_dir=record["run_dir"], run_name=record["run_name"])
        elif event == "worker" and record.get("placement_group"):
            state["placement_group"] = record["placement_group"]  # for the driver's clean-up
        elif event == "checkpoint":
            state["checkpoint"] = record["path"]
            report = dict(held if held is not None and held["step"] == record["step"] else state)
            report["checkpoint"] = record["path"]
            held = None
            if metric in report:
                report_with_pointer(report, record["path"], record["step"])
        elif event is None:
            state.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
            if metric in record:  # schedulers compare trials on reports that carry the metric
                if held is not None:
                    tune.report(held)
                    held = None
                if every and (state["step"] % every == 0 or state["step"] == total):
                    held = dict(state)  # sent with the checkpoint this step writes
                else:
                    tune.report(dict(state))
    if held is not None:
        tune.report(held)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.error is not None:
        raise RuntimeError(f"trial run {run_name} failed: {result.error}")
    state.update(mlflow_run_id=result.run_id, checkpoint=result.checkpoint or "", status=result.status)
    if metric not in state and result.checkpoint:
        # A restarted trial whose run had already reached its end (it ran on while Tune paused
        # it) logs nothing new: its last checkpoint's metadata has the step and metrics it ended with.
        from shipyard.train.storage import filesystem
        fs, path = filesystem(result.checkpoint, spec.storage)
        with fs.open_input_stream(f"{path}/{ckpt.META}") as f:
            meta = json.loads(f.read())
        state.update(step=meta["step"], **{k: v for k, v in (meta.get("metrics") or {}).items()
                                           if isinstance(v, (int, float))})
    if metric in state and result.checkpoint:
        report_with_pointer(dict(state), result.checkpoint, int(state.get("step", 0)))
    elif metric in state:
        tune.report(dict(state))


def _read_pointer(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / POINTER).read_text())


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
    """Feeds the live table (found in `_LIVE`, so a callback restored from Tune's experiment
    state drives the resumed sweep's table), and removes the placement groups of trials Tune has
    stopped, paused or lost: their Train runs are killed mid-run with the trial actor and the
    worker placement group would outlive them (ray#54305; see launch._release_placement_groups)."""

    def __init__(self):
        self.released: set[str] = set()

    def _update(self, trials):
        if _LIVE["table"] is not None:
            _LIVE["table"].update(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _LIVE["on_result"]:
            _LIVE["on_result"](trial.trial_id, result)
        self._update(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials)

    def on_step_end(self, iteration, trials, **info):
        import threading
        from shipyard.train.launch import _release_placement_groups
        for trial in trials:
            group = (trial.last_result or {}).get("placement_group")
            if group and group not in self.released and trial.status in ("PAUSED", "TERMINATED", "ERROR"):
                self.released.add(group)
                threading.Thread(target=_release_placement_groups, args=({group}, 5.0), daemon=True).start()


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

    def final(self, outcomes: list[TrialOutcome], best: TrialOutcome | None, interrupted: str = "") -> None:
        if self.quiet:
            return
        rows = [[o.trial_id, o.status, *[_fmt(o.params.get(k)) for k in self.sweep.tune.space], str(o.step),
                 _fmt(o.metric)] for o in outcomes]
        table = self._render(rows)
        table.caption = (f"interrupted: `shipyard sweep --resume {interrupted}` continues it" if interrupted else
                         f"best: {best.trial_id} {_fmt(best.metric)}" if best else "no trial reported the metric")
        self.console.print(table)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
