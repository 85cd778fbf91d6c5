"""What `shipyard serve TARGET` serves: a checkpoint, found the way `export` and `report` find one.

TARGET is, in this order: a checkpoint or run directory (local or `s3://`), an MLflow run (id, id
prefix or name; its newest complete checkpoint), or a registered model in the MLflow model
registry (`NAME`, `NAME/VERSION` or `models:/NAME/VERSION|latest`; the checkpoint the version was
made from, tag `shipyard.checkpoint`, as a sweep registers its best trial). The first two are
`shipyard.export.resolve_checkpoint`; this module adds the run's identity and the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shipyard.export import _checkpoint_in, resolve_checkpoint
from shipyard.spec import StorageSpec


@dataclass(frozen=True)
class Target:
    checkpoint: str
    """A complete checkpoint directory (local path or s3:// URI)."""
    storage: StorageSpec | None
    """How to reach it (endpoint, region); None = defaults and the environment."""
    run_id: str | None = None
    run_name: str | None = None
    registered_model: str | None = None
    """"NAME/VERSION" when served from the model registry."""


def resolve(target: str, tracking_uri: str | None = None) -> Target:
    if target.startswith(("s3://", "models:/")) or Path(target).is_dir():
        if target.startswith("models:/"):
            return _registered(target[len("models:/"):], tracking_uri)
        uri, storage = resolve_checkpoint(target, tracking_uri)
        return Target(uri, storage, run_name=_run_name_of(uri))
    from shipyard.cli import find_run
    from shipyard.train.tracking import client
    try:
        run = find_run(client(tracking_uri), target)
    except LookupError as no_run:
        try:
            return _registered(target, tracking_uri)
        except LookupError:
            raise LookupError(f"{no_run.args[0]}; nor is {target!r} a checkpoint directory or a "
                              f"registered model") from None
    uri, storage = resolve_checkpoint(run.info.run_id, tracking_uri)
    return Target(uri, storage, run.info.run_id, run.info.run_name)


def _run_name_of(checkpoint: str) -> str | None:
    """Checkpoints live in `<run name>/checkpoint-<step>`."""
    parts = checkpoint.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1].startswith("checkpoint-") else None


def _registered(name: str, tracking_uri: str | None) -> Target:
    from mlflow.exceptions import MlflowException
    from shipyard.train.tracking import client
    mlflow = client(tracking_uri)
    name, _, version = name.partition("/")
    try:
        if version and version != "latest":
            mv = mlflow.get_model_version(name, version)
        else:
            versions = mlflow.search_model_versions(f"name = '{name}'")
            if not versions:
                raise LookupError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException:
        raise LookupError(f"no registered model {name!r}"
                          + (f" version {version}" if version else "")) from None
    checkpoint = (mv.tags or {}).get("shipyard.checkpoint")
    if not checkpoint:
        raise LookupError(f"registered model {name} version {mv.version} has no "
                          f"`shipyard.checkpoint` tag (it was not registered by Shipyard)")
    trial = (mv.tags or {}).get("shipyard.trial_run")
    # the trial run's spec says how to reach its storage (endpoint, region)
    storage = resolve_checkpoint(trial, tracking_uri)[1] if trial else None
    uri = _checkpoint_in(checkpoint.rstrip("/"), storage)
    run_id = trial or mv.run_id
    run_name = mlflow.get_run(run_id).info.run_name if run_id else None
    return Target(uri, storage, run_id, run_name, f"{name}/{mv.version}")
