"""Sweep specs: a job, a search space over its fields, and how Ray Tune explores it.

A sweep file (under `jobs/sweeps/`) points at a job spec and names fields of it by dotted path:

    # shipyard sweep jobs/sweeps/layerskip-asha.yaml
    name: layerskip-asha
    job: ../layerskip/stdlib-code.yaml        # relative to this file
    overrides: {train.steps: 200}             # applied to the job first, like `key.sub=value`
    tune:
      metric: val/loss                        # a metric the job reports (train/... or val/...)
      mode: min
      num_samples: 6                          # trials (per grid point, with grid axes)
      max_concurrent: 2                       # trials running at once (the rest queue)
      space:
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
        model.p_max: {choice: [0.0, 0.2, 0.5]}
      scheduler: {type: asha, grace_period: 50, reduction_factor: 2}

Distributions: `choice: [a, b, ...]`, `uniform: [lo, hi]`, `loguniform: [lo, hi]`,
`randint: [lo, hi]` (hi exclusive) and `grid: [a, b, ...]` (every value, for each sample).
Every path must be a field of the job spec, and every value must be one the field accepts: the
space is checked by building the job with each distribution's bounds / candidates, so mistakes
come back as the job's own errors, prefixed by `tune.space.<path>`.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shipyard.spec import (JobSpec, SpecError, _dataclass, _show, _unknown, apply_overrides, load_spec_file,
                           parse_job)

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")


@dataclass
class SchedulerSpec:
    type: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = 0
    """ASHA: steps every trial runs before it can be stopped; 0 = the job's eval_every (or 10%)."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor of trials at each rung."""
    perturbation_interval: int = 0
    """PBT: steps between exploit/explore decisions; 0 = the job's train.checkpoint_every. Must be
    a multiple of checkpoint_every (a trial can only be cloned from a checkpoint)."""
    mutate: list[str] = field(default_factory=list)
    """PBT: the space's fields it perturbs (default: all of them); the rest stay as sampled."""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction of trials clones the top fraction at each decision."""
    synch: bool = False
    """PBT: decide only once every trial has reached the decision step (the ones there first
    pause and free their resources), so the decision never depends on which trial ran first."""
    resample_probability: float = 0.25
    """PBT: chance that a perturbed field is resampled from its distribution instead of being
    scaled by 0.8/1.2 (ranges) or moved to a neighbouring value (lists)."""


@dataclass
class TuneSpec:
    metric: str
    mode: Literal["min", "max"] = "min"
    num_samples: int = 4
    max_concurrent: int = 2
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: Literal["random", "grid", "optuna"] = "random"
    """`random` samples every distribution; `grid` needs only `grid` / `choice` axes and runs
    every combination num_samples times; `optuna` is Optuna's TPE (needs `pip install optuna`;
    no `grid` axes)."""
    time_budget_s: float | None = None
    """Stop starting and running trials after this many seconds (None: no budget)."""
    seed: int = 0
    """Seed of the search (trial parameters), not of the trials' training."""


@dataclass
class SweepSpec:
    name: str
    job_path: Path
    job_raw: dict
    """The job spec as plain data, overrides applied."""
    job: JobSpec
    tune: TuneSpec
    path: Path | None = None
    """The sweep file (what `shipyard sweep --resume` reloads)."""
    overrides: tuple[str, ...] = ()
    """Command-line overrides applied to the job."""

    def trial_raw(self, params: dict[str, Any]) -> dict:
        """The job of one trial as plain data: the base job with `params` (dotted paths) set."""
        return apply_overrides(self.job_raw, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                              for k, v in params.items()])


def is_sweep(raw: Any) -> bool:
    return isinstance(raw, dict) and "job" in raw and "tune" in raw


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and validate a sweep file; `overrides` (`key.sub=value`) apply to the job."""
    path = Path(path)
    sweep = load_spec_file(path, "sweep spec", lambda raw: parse_sweep(raw, path.parent, overrides))
    return dataclasses.replace(sweep, path=path.resolve(), overrides=tuple(overrides))


def parse_sweep(raw: Any, base: Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError(f"  (top level): expected a mapping, got {_show(raw)}")
    allowed = ["name", "job", "overrides", "tune"]
    errors += [_unknown(str(k), k, allowed) for k in raw if k not in allowed]
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        errors.append(f"name: {_show(name)} is not a valid sweep name")
    job_ref = raw.get("job")
    job_raw = None
    if not isinstance(job_ref, str):
        errors.append(f"job: {_show(job_ref)}; give the path of a job spec (relative to the sweep file)")
    else:
        job_path = (base / job_ref).resolve()
        try:
            job_raw = yaml.safe_load(job_path.read_text())
        except FileNotFoundError:
            errors.append(f"job: {job_ref!r} does not exist (looked for {job_path})")
    extra = raw.get("overrides") or {}
    if not isinstance(extra, dict):
        errors.append(f"overrides: expected a mapping of dotted paths to values, got {_show(extra)}")
        extra = {}
    tune_raw = raw.get("tune")
    tune = _dataclass(TuneSpec, tune_raw if isinstance(tune_raw, dict) else {}, "tune", errors) \
        if isinstance(tune_raw, dict) else None
    if not isinstance(tune_raw, dict):
        errors.append(f"tune: expected a mapping (metric, mode, space, ...), got {_show(tune_raw)}")
    if errors:
        raise SpecError("\n".join("  " + e for e in errors))

    pairs = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in extra.items()]
    job_raw = apply_overrides(job_raw, [*pairs, *overrides])
    try:
        job = parse_job(job_raw)
    except SpecError as e:
        raise SpecError(f"  job {job_ref} (with the sweep's overrides):\n{e}") from None
    _check_tune(tune, job, job_raw, errors)
    if errors:
        raise SpecError("\n".join("  " + e for e in errors))
    return SweepSpec(name=name, job_path=job_path, job_raw=job_raw, job=job, tune=tune)


def _check_tune(tune: TuneSpec, job: JobSpec, job_raw: dict, errors: list[str]) -> None:
    import re
    if not re.fullmatch(r"(train|val)/\S+", tune.metric):
        errors.append(f"tune.metric: {tune.metric!r} is not a metric name; use train/<name> or val/<name>")
    elif tune.metric.startswith("val/") and tune.scheduler.type == "asha" and not job.train.eval_every:
        errors.append(f"tune.metric: {tune.metric} is only measured at the end of a run (train.eval_every "
                      "is 0), so ASHA could never compare trials early; set train.eval_every in overrides")
    if tune.num_samples < 1:
        errors.append(f"tune.num_samples: {tune.num_samples} must be at least 1")
    if tune.max_concurrent < 1:
        errors.append(f"tune.max_concurrent: {tune.max_concurrent} must be at least 1")
    if tune.scheduler.type == "pbt":
        _check_pbt(tune, job, errors)
    if tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            errors.append("tune.search: 'optuna' needs the optuna package (pip install optuna); "
                          "or use 'random' or 'grid'")
        if any(next(iter(d)) == "grid" for d in tune.space.values() if isinstance(d, dict) and d):
            errors.append("tune.search: 'optuna' samples its own points and cannot enumerate `grid` axes; "
                          "use choice instead")
    if tune.scheduler.reduction_factor < 2:
        errors.append(f"tune.scheduler.reduction_factor: {tune.scheduler.reduction_factor} must be at least 2")
    if not tune.space:
        errors.append("tune.space: empty; name at least one job field, e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    for path, dist in tune.space.items():
        where = f"tune.space.{path}"
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            errors.append(f"{where}: {_show(dist)} is not a distribution; use one of "
                          + ", ".join(f"{{{d}: [...]}}" for d in DISTRIBUTIONS))
            continue
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or not args:
            errors.append(f"{where}.{kind}: expected a non-empty list, got {_show(args)}")
            continue
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    or not args[0] < args[1]:
                errors.append(f"{where}.{kind}: expected [low, high] numbers with low < high, got {args!r}")
                continue
            if kind == "loguniform" and args[0] <= 0:
                errors.append(f"{where}.loguniform: the low bound must be positive, got {args[0]}")
                continue
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                errors.append(f"{where}.randint: expected integers, got {args!r}")
                continue
        if tune.search == "grid" and kind not in ("grid", "choice"):
            errors.append(f"{where}: search 'grid' enumerates grid/choice axes only, not {kind}")
        # Each candidate (or bound) must be a value the job field accepts.
        candidates = args if kind in ("choice", "grid") else ([args[0], args[1] - 1] if kind == "randint" else args)
        for value in candidates:
            try:
                parse_job(apply_overrides(job_raw, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"]))
            except SpecError as e:
                lines = [l.strip() for l in str(e).splitlines() if l.strip()]
                errors.append(f"{where}: {value!r} does not make a valid job: " + "; ".join(lines))
                break


def _check_pbt(tune: TuneSpec, job: JobSpec, errors: list[str]) -> None:
    """PBT clones trials from checkpoints at its decisions, so checkpoints and the metric must
    both exist at every decision step."""
    s, every = tune.scheduler, job.train.checkpoint_every
    if not every:
        errors.append("tune.scheduler.type: 'pbt' clones trials from checkpoints; set train.checkpoint_every "
                      "(in the sweep's overrides)")
        return
    interval = s.perturbation_interval or every
    if s.perturbation_interval < 0 or interval % every:
        errors.append(f"tune.scheduler.perturbation_interval: {s.perturbation_interval} must be a multiple of "
                      f"train.checkpoint_every ({every})")
    measured = job.train.eval_every if tune.metric.startswith("val/") else job.train.log_every
    if not measured or every % measured:
        field_name = "eval_every" if tune.metric.startswith("val/") else "log_every"
        errors.append(f"tune.metric: {tune.metric} must be measured at every checkpoint for PBT: "
                      f"train.checkpoint_every ({every}) must be a multiple of train.{field_name} ({measured})")
    if job.checkpoint.keep == 1:
        errors.append("checkpoint.keep: 1 would delete a checkpoint PBT is about to clone; use 0 (all) or >= 2")
    for path in s.mutate:
        if path not in tune.space:
            errors.append(f"tune.scheduler.mutate: {path!r} is not in tune.space (" + ", ".join(tune.space) + ")")
    if not 0 < s.quantile_fraction <= 0.5:
        errors.append(f"tune.scheduler.quantile_fraction: {s.quantile_fraction} must be in (0, 0.5]")
    if not 0 <= s.resample_probability <= 1:
        errors.append(f"tune.scheduler.resample_probability: {s.resample_probability} must be in [0, 1]")
    if tune.num_samples * max(1, _grid_size(tune)) < 2:
        errors.append(f"tune.num_samples: PBT needs a population of at least 2 trials, got {tune.num_samples}")


def _grid_size(tune: TuneSpec) -> int:
    n = 1
    for d in tune.space.values():
        if isinstance(d, dict) and len(d) == 1 and "grid" in d and isinstance(d["grid"], list):
            n *= len(d["grid"])
    return n
