"""Turning a finished checkpoint back into a model: `shipyard export` and the loaders serving uses.

A target is a checkpoint directory (local or `s3://`), a run directory, or an MLflow run (id, id
prefix or name) whose newest complete checkpoint is taken. Only the consolidated
`model.safetensors` and the JSON metadata are read.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from torch import nn

from shipyard.registry import MODELS
from shipyard.spec import JobSpec, StorageSpec, parse_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.storage import download, filesystem


def resolve_checkpoint(target: str, tracking_uri: str | None = None) -> tuple[str, StorageSpec | None]:
    """The checkpoint a user means by `target`, as (uri, storage options to reach it)."""
    if target.startswith("s3://") or Path(target).is_dir():
        return _checkpoint_in(target.rstrip("/"), None), None
    from shipyard.cli import find_run
    from shipyard.train.tracking import TAG, client
    mlflow = client(tracking_uri)
    run = find_run(mlflow, target)
    with open(mlflow.download_artifacts(run.info.run_id, "spec.yaml")) as f:
        import yaml
        storage = parse_job(yaml.safe_load(f)).storage
    return _checkpoint_in(run.data.tags[TAG + "run_dir"], storage), storage


def _checkpoint_in(uri: str, storage: StorageSpec | None) -> str:
    if not uri.startswith("s3://"):
        uri = str(Path(uri).resolve())
    fs, path = filesystem(uri, storage)
    if ckpt.read_manifest(fs, path) is not None:
        return uri
    found = ckpt.latest_complete(fs, path)  # a run directory
    if not found:
        raise LookupError(f"{uri}: neither a complete checkpoint nor a run directory with one")
    return "s3://" + found if uri.startswith("s3://") else found


@contextlib.contextmanager
def local_checkpoint(uri: str, storage: StorageSpec | None = None) -> Iterator[Path]:
    """A local directory holding the checkpoint's weights and metadata (downloaded if remote)."""
    fs, path = filesystem(uri, storage)
    with tempfile.TemporaryDirectory(prefix="shipyard-ckpt-") as tmp:
        local = Path(tmp)
        if uri.startswith("s3://"):
            for name in (ckpt.META, ckpt.WEIGHTS, ckpt.MANIFEST):
                with fs.open_input_stream(f"{path}/{name}") as src, open(local / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            local = download(fs, path, local)
        yield local


def load_model(directory: Path) -> tuple[nn.Module, JobSpec, ckpt.Meta]:
    """Build the family's model from a local checkpoint's spec and load its consolidated weights."""
    meta = ckpt.read_meta(directory)
    spec = parse_job(meta.spec)
    model = MODELS[spec.family].build(spec.model)
    model.load_state_dict(ckpt.load_weights(directory), strict=True)
    return model.eval(), spec, meta


def export(uri: str, fmt: str, out: Path, storage: StorageSpec | None = None) -> list[str]:
    """Write the checkpoint's model to `out` in format `fmt`; returns the files written."""
    with local_checkpoint(uri, storage) as directory:
        model, spec, meta = load_model(directory)
        family = MODELS[spec.family]
        formats = ["safetensors", *family.exports]
        if fmt not in formats:
            raise ValueError(f"--format {fmt!r}: family {spec.family} exports {', '.join(formats)}")
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            shutil.copyfile(directory / ckpt.WEIGHTS, out / ckpt.WEIGHTS)
            (out / "shipyard.json").write_text(json.dumps(
                {"family": spec.family, "model": spec.to_dict()["model"], "step": meta.step,
                 "format_version": meta.format_version}, indent=1))
        else:
            family.exports[fmt](model, spec.model, out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
