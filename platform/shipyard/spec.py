"""Job specs: typed, strict, and loud about mistakes.

A job spec is a YAML file with the blocks below. Every block is a dataclass; unknown keys and wrong
types are errors that name the field path, the bad value and what is allowed, all of them at once.
The `model:` and `data:` blocks belong to the model family named by `model.family` and are read
into that family's own `Config` / `DataConfig` dataclasses (see `shipyard.registry.MODELS`).

YAML 1.1 reads `3e-4` as a string (it wants `3.0e-4`); float fields accept such numeric strings,
as YAML 1.2 and every user would expect.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class SpecError(ValueError):
    """A job spec that cannot run; the message lists every problem with its field path."""


@dataclass
class TrainSpec:
    steps: int = 1000
    """Optimizer steps in the whole run."""
    batch_size: int = 16
    """Global batch (samples per optimizer step), split evenly across workers."""
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr`, then `lr_schedule`."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_every: int = 0
    """Evaluate on the validation set every N steps (and always at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation (global batches, sharded across workers)."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (and always at the end); 0 = only at the end."""
    log_every: int = 10
    """Report metrics to the driver (progress bar, MLflow) every N steps."""
    seed: int = 0
    nonfinite: Literal["fail", "skip"] = "fail"
    """A NaN/inf loss: `fail` stops the run with an error naming the step (the last complete
    checkpoint stays usable); `skip` drops that step's update on every worker and goes on."""
    max_skipped_steps: int = 10
    """With `nonfinite: skip`: fail anyway after this many non-finite steps in a row (divergence)."""


@dataclass
class ScalingSpec:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement: Literal["pack", "spread"] = "pack"
    """`spread` puts workers on different nodes where the cluster has them."""


@dataclass
class ShardingSpec:
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage (deepspeed only)."""
    offload: bool = False
    """DeepSpeed: offload optimizer state (and parameters at stage 3) to CPU memory."""
    find_unused_parameters: bool = False
    """DDP: needed when some parameters may get no gradient on a step (e.g. layer dropout)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3 like); False keeps them (ZeRO-2 like)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config merged (recursively) over the one built from this spec."""


@dataclass
class TrackingSpec:
    experiment: str = "shipyard"
    uri: str | None = None
    """MLflow tracking URI; default: sqlite at `.shipyard/mlflow.db`."""
    required: bool = False
    """False: if the tracking server goes away mid-run, training goes on; metrics are buffered,
    retried, and a warning is printed. True: stop the run instead."""


@dataclass
class StorageSpec:
    path: str | None = None
    """Where checkpoints go: a local directory or `s3://bucket/prefix`; default `.shipyard/runs`."""
    endpoint_url: str | None = None
    """S3-compatible endpoint; default `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS."""
    region: str | None = None
    """Default `AWS_REGION` / `AWS_DEFAULT_REGION`."""
    access_key_id: str | None = None
    """Default: the usual AWS environment variables / profile. Never logged or stored."""
    secret_access_key: str | None = None
    """Never logged or stored; pass it again (or use the environment) to resume."""


SECRETS = {("storage", "access_key_id"), ("storage", "secret_access_key")}


@dataclass
class CheckpointSpec:
    keep: int = 0
    """Keep only the N newest complete checkpoints (plus the best by `best_metric`); 0 keeps all."""
    best_metric: str | None = None
    """Also keep the checkpoint with the best value of this metric (e.g. `val/loss`), measured at
    or before the checkpoint's step."""
    best_mode: Literal["min", "max"] = "min"


@dataclass
class FailureSpec:
    max_failures: int = 0
    """Restarts of the worker group (from the last complete checkpoint) before the run fails."""


@dataclass
class StageSpec:
    """One stage of a multi-stage job (`stages:`). Each stage is its own run (an MLflow child run
    of the job's parent run); a stage after the first starts from the previous stage's final
    checkpoint, changed by the family's `transform` (e.g. TokenFormer's `grow`), if any."""

    name: str
    """The stage's name; its run is `<job run>-<name>`."""
    steps: int
    """Optimizer steps of this stage (its `train.steps`; the step count restarts at 0)."""
    transform: str | None = None
    """A transform of the model family applied to the previous stage's model (not on the first)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The transform's arguments, checked against the family's dataclass for them."""
    optimizer: Literal["continue", "fresh"] = "continue"
    """`continue`: the previous stage's optimizer state (moments, step count) carries over,
    transformed along with the model; `fresh`: a new optimizer."""
    train: dict[str, Any] = field(default_factory=dict)
    """Fields of the `train:` block that differ in this stage (e.g. lr, warmup_steps)."""


@dataclass
class LaplaceSpec:
    """The post-hoc `laplace:` stage: a last-layer Laplace approximation fitted on a finished
    classifier checkpoint (`shipyard laplace RUN`, or after training with `after_training`), scored
    (NLL, ECE, accuracy, OOD AUROC / FPR95) and logged as its own MLflow run in the job's
    experiment. See shipyard.posthoc.laplace and shipyard_models.laplace.last_layer."""

    after_training: bool = False
    """Run the stage on the run's final checkpoint when `shipyard run` finishes."""
    methods: list[Literal["icla", "diag", "kfac", "full"]] = field(
        default_factory=lambda: ["icla", "diag", "kfac", "full"])
    """Posteriors to fit: identity curvature (ICLA), diagonal, KFAC, full GGN (the MAP is always scored)."""
    prior: Literal["marglik", "val"] = "marglik"
    """Prior precision of diag / kfac / full: marginal likelihood, or validation NLL."""
    icla_prior: Literal["val", "diag", "kfac", "full"] = "val"
    """ICLA's prior precision: `val` (curvature-free from the start, validation NLL), or the one
    that curvature's method gets (tuned as `prior` says), after which the curvature is dropped."""
    predictive: Literal["probit", "mc"] = "probit"
    mc_samples: int = 1000
    """Monte Carlo draws per input (predictive: mc)."""
    seed: int = 0


@dataclass
class JobSpec:
    name: str
    family: str
    model: Any
    data: Any
    train: TrainSpec = field(default_factory=TrainSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    sharding: ShardingSpec = field(default_factory=ShardingSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    failure: FailureSpec = field(default_factory=FailureSpec)
    stages: list[StageSpec] = field(default_factory=list)
    """Empty: a single-stage job. Otherwise the stages run in order (see StageSpec, stages.py)."""
    laplace: LaplaceSpec = field(default_factory=LaplaceSpec)

    def to_dict(self, secrets: bool = False) -> dict[str, Any]:
        """The spec as plain data, in the same shape as the YAML (`model.family` included).

        Credentials are left out unless `secrets=True` (only for handing the spec to workers).
        """
        out = {"name": self.name, "model": {"family": self.family, **dataclasses.asdict(self.model)}}
        for f in dataclasses.fields(self)[4:]:
            if f.name != "stages":
                out[f.name] = dataclasses.asdict(getattr(self, f.name))
        out["data"] = dataclasses.asdict(self.data)
        if self.laplace == LaplaceSpec():  # an unused post-hoc stage stays out of params and spec.yaml
            del out["laplace"]
        if self.stages:
            out["stages"] = [dataclasses.asdict(s) for s in self.stages]
        if not secrets:
            for block, key in SECRETS:
                out[block][key] = None
        return out


_BLOCKS = {f.name: f.type for f in dataclasses.fields(JobSpec)[4:] if f.name != "stages"}


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a job spec file, apply `key.sub=value` overrides, validate, return the typed spec."""
    return load_spec_file(path, "job spec", lambda raw: parse_job(raw, overrides))


def load_spec_file(path: str | Path, kind: str, parse):
    """`parse(raw)` of a YAML file; every error names the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such {kind}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    try:
        return parse(raw)
    except SpecError as e:
        raise SpecError(f"{path}:\n{e}") from None


def parse_job(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Validate plain data (as read from YAML) into a `JobSpec`; raise `SpecError` listing all problems."""
    from shipyard.registry import MODELS  # imports the model packages (torch): only when parsing
    if not isinstance(raw, dict):
        raise SpecError(f"  (top level): expected a mapping of blocks, got {_show(raw)}")
    raw = apply_overrides(raw, overrides)
    errors: list[str] = []
    allowed = ["name", "model", "data", *_BLOCKS, "stages"]
    for key in raw:
        if key not in allowed:
            errors.append(_unknown(str(key), key, allowed))
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        errors.append(f"name: {_show(name)} is not a valid job name; use letters, digits, '-', '_', '.'")

    model_raw = raw.get("model")
    family_name, model, data = None, None, None
    if not isinstance(model_raw, dict) or "family" not in model_raw:
        errors.append(f"model.family: missing; choose one of {', '.join(MODELS)}")
    elif model_raw["family"] not in MODELS:
        errors.append(f"model.family: {_show(model_raw['family'])} is not a known family; "
                      f"choose one of {', '.join(MODELS)}")
    else:
        family_name = model_raw["family"]
        fam = MODELS[family_name]
        model = _dataclass(fam.Config, {k: v for k, v in model_raw.items() if k != "family"}, "model", errors)
        data = _dataclass(fam.DataConfig, raw.get("data") or {}, "data", errors)

    blocks = {k: _dataclass(tp, raw.get(k) or {}, k, errors) for k, tp in _resolved_blocks().items()}
    stages = _stages(raw.get("stages"), errors)
    if errors:
        raise SpecError("\n".join("  " + e for e in errors))
    spec = JobSpec(name=name, family=family_name, model=model, data=data, **blocks, stages=stages)
    _check_consistency(spec)
    _check_stages(spec)
    return spec


def _stages(value: Any, errors: list[str]) -> list[StageSpec]:
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        errors.append(f"stages: expected a non-empty list of stages, got {_show(value)}")
        return []
    return [_dataclass(StageSpec, v, f"stages[{i}]", errors) for i, v in enumerate(value)]


def stage_spec(spec: JobSpec, index: int) -> JobSpec:
    """The single-stage spec stage `index` of a multi-stage job runs: the model after every
    transform up to it, its own steps and train fields, the rest as the job's."""
    from shipyard.registry import MODELS
    family = MODELS[spec.family]
    model = spec.model
    for stage in spec.stages[1:index + 1]:
        if stage.transform is not None:
            transform = family.transforms[stage.transform]
            model = transform.config(model, transform.Args(**stage.args))
    stage = spec.stages[index]
    train = TrainSpec(**{**dataclasses.asdict(spec.train), **stage.train, "steps": stage.steps})
    return dataclasses.replace(spec, name=f"{spec.name}-{stage.name}", model=model, train=train, stages=[])


def _check_stages(spec: JobSpec) -> None:
    """Stage fields the dataclass cannot check alone: names, transforms and their arguments,
    each stage's train block, and whether the strategy can start from a converted checkpoint."""
    if not spec.stages:
        return
    from shipyard.registry import MODELS
    family = MODELS[spec.family]
    errs: list[str] = []
    seen: set[str] = set()
    for i, stage in enumerate(spec.stages):
        at = f"stages[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stage.name):
            errs.append(f"{at}.name: {stage.name!r} is not a valid stage name; use letters, digits, '-', '_', '.'")
        elif stage.name in seen:
            errs.append(f"{at}.name: {stage.name!r} is used by an earlier stage; stage names must differ")
        seen.add(stage.name)
        if stage.steps < 1:
            errs.append(f"{at}.steps: {stage.steps} must be at least 1")
        if "steps" in stage.train:
            errs.append(f"{at}.train.steps: set the stage's steps as {at}.steps")
        if i == 0 and stage.transform is not None:
            errs.append(f"{at}.transform: the first stage trains the model as the spec builds it; "
                        "a transform needs a previous stage")
        elif stage.transform is not None and stage.transform not in family.transforms:
            choices = ", ".join(family.transforms) or "none (this family has no transforms)"
            errs.append(f"{at}.transform: {stage.transform!r} is not a transform of family "
                        f"{spec.family}; choose one of {choices}")
        elif stage.transform is not None:
            args = _dataclass(family.transforms[stage.transform].Args, stage.args, f"{at}.args", errs)
            if args is not None:
                try:
                    family.transforms[stage.transform].config(stage_spec(spec, i - 1).model, args)
                except (TypeError, ValueError) as e:
                    errs.append(f"{at}.args: the transformed model is invalid: {e}")
        elif stage.args:
            errs.append(f"{at}.args: only a stage with a transform takes arguments")
        _dataclass(TrainSpec, {**dataclasses.asdict(spec.train), **stage.train}, f"{at}.train", errs)
    if errs:
        raise SpecError("\n".join("  " + e for e in errs))
    for i in range(len(spec.stages)):
        try:
            _check_consistency(stage_spec(spec, i))
        except SpecError as e:
            errs += [f"stages[{i}]: {line.strip()}" for line in str(e).splitlines()]
    if len(spec.stages) > 1 and spec.sharding.strategy == "deepspeed":
        errs.append("sharding.strategy: 'deepspeed' cannot run the stages after the first (they start "
                    "from a converted torch.distributed.checkpoint); choose 'ddp' or 'fsdp'")
    if errs:
        raise SpecError("\n".join("  " + e for e in errs))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` set; values are read as YAML scalars."""
    import copy
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"  override {item!r}: expected key.sub=value")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise SpecError(f"  override {item!r}: {p} is not a block")
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"steps": 5}}` -> `{"train.steps": 5}` (for MLflow params and overrides)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_consistency(spec: JobSpec) -> None:
    errs = []
    t, s = spec.train, spec.scaling
    for name in ("steps", "batch_size", "log_every", "eval_batches"):
        if getattr(t, name) < 1:
            errs.append(f"train.{name}: {getattr(t, name)} must be at least 1")
    for name in ("eval_every", "checkpoint_every", "warmup_steps"):
        if getattr(t, name) < 0:
            errs.append(f"train.{name}: {getattr(t, name)} must be 0 or more")
    if t.lr <= 0:
        errs.append(f"train.lr: {t.lr} must be positive")
    if s.num_workers < 1:
        errs.append(f"scaling.num_workers: {s.num_workers} must be at least 1")
    elif t.batch_size % s.num_workers:
        errs.append(f"train.batch_size: {t.batch_size} is not divisible by scaling.num_workers="
                    f"{s.num_workers}; the global batch is split evenly across workers")
    if s.cpus_per_worker <= 0:
        errs.append(f"scaling.cpus_per_worker: {s.cpus_per_worker} must be positive")
    if spec.checkpoint.keep < 0:
        errs.append(f"checkpoint.keep: {spec.checkpoint.keep} must be 0 (keep all) or more")
    if spec.checkpoint.best_metric is not None and not re.fullmatch(r"(train|val)/\S+", spec.checkpoint.best_metric):
        errs.append(f"checkpoint.best_metric: {spec.checkpoint.best_metric!r} is not a metric name; "
                    "use train/<name> or val/<name>, e.g. val/loss")
    if t.max_skipped_steps < 1:
        errs.append(f"train.max_skipped_steps: {t.max_skipped_steps} must be at least 1")
    if spec.failure.max_failures < -1:
        errs.append(f"failure.max_failures: {spec.failure.max_failures} must be -1 (unlimited) or more")
    if spec.sharding.strategy != "deepspeed" and (spec.sharding.deepspeed or spec.sharding.offload):
        errs.append("sharding.deepspeed / sharding.offload: only apply to strategy 'deepspeed', "
                    f"not {spec.sharding.strategy!r}")
    if spec.laplace != LaplaceSpec():
        from shipyard.posthoc.laplace import TASKS  # imports the family packages: only when used
        if spec.family not in TASKS:
            errs.append(f"laplace: family {spec.family!r} has no Laplace stage; families with one: "
                        f"{', '.join(TASKS)}")
        if not spec.laplace.methods or len(set(spec.laplace.methods)) != len(spec.laplace.methods):
            errs.append(f"laplace.methods: {spec.laplace.methods} must name at least one method, each once")
        if spec.laplace.mc_samples < 1:
            errs.append(f"laplace.mc_samples: {spec.laplace.mc_samples} must be at least 1")
    if errs:
        raise SpecError("\n".join("  " + e for e in errs))


def _resolved_blocks() -> dict[str, type]:
    hints = get_type_hints(JobSpec)
    return {k: hints[k] for k in _BLOCKS}


def _dataclass(cls: type, value: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping, got {_show(value)}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, v in value.items():
        if key not in fields:
            errors.append(_unknown(f"{path}.{key}", key, list(fields)))
            continue
        kwargs[key] = _convert(v, hints[key], f"{path}.{key}", errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}.{name}: required field is missing")
    if any(e.startswith(path + ".") or e.startswith(path + ":") for e in errors):
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a family's own __post_init__ checks
        errors.append(f"{path}: {e}")
        return None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(v: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return v
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if v is None and type(None) in options:
            return None
        trial: list[str] = []
        for opt in options:
            if opt is type(None):
                continue
            out = _convert(v, opt, path, trial)
            if not trial:
                return out
            trial.clear()
        errors.append(f"{path}: {_show(v)} is not {_type_name(tp)}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if any(v == a and type(v) is type(a) for a in allowed):
            return v
        errors.append(f"{path}: {_show(v)} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return None
    if is_dataclass_type(tp):
        return _dataclass(tp, v, path, errors)
    if origin is dict:
        if not isinstance(v, dict):
            errors.append(f"{path}: expected a mapping, got {_show(v)}")
            return None
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _convert(x, vt, f"{path}.{k}", errors) for k, x in v.items()}
    if origin in (list, tuple):
        if not isinstance(v, list):
            errors.append(f"{path}: expected a list, got {_show(v)}")
            return None
        (et, *_) = get_args(tp) or (Any,)
        out = [_convert(x, et, f"{path}[{i}]", errors) for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str) and _FLOAT_RE.fullmatch(v.strip()):
            return float(v)
    elif tp is str:
        if isinstance(v, str):
            return v
    else:
        raise AssertionError(f"spec field {path} has a type the validator does not know: {tp}")
    errors.append(f"{path}: expected {_type_name(tp)}, got {_show(v)}")
    return None


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _show(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})" if v is not None else "nothing (null or missing)"


def _unknown(path: str, key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown field{hint}; allowed: {', '.join(allowed)}"
