"""Turning a finished checkpoint back into a model: `shipyard export` and the loaders serving uses.

A target is a checkpoint directory, or an MLflow run (id, id prefix or name) whose newest complete
checkpoint is taken. Only the consolidated `model.safetensors` and the JSON metadata are read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from shipyard.registry import MODELS
from shipyard.spec import JobSpec, parse_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.storage import filesystem


def resolve_checkpoint(target: str, tracking_uri: str | None = None) -> str:
    """The checkpoint directory a user means by `target` (a path or an MLflow run)."""
    path = Path(target)
    if path.is_dir():
        fs, p = filesystem(str(path.resolve()))
        if ckpt.read_manifest(fs, p) is not None:
            return p
        found = ckpt.latest_complete(fs, p)  # a run directory
        if found:
            return found
        raise LookupError(f"{target}: neither a complete checkpoint nor a run directory with one")
    from shipyard.cli import find_run
    from shipyard.train.tracking import TAG, client
    run = find_run(client(tracking_uri), target)
    run_dir = run.data.tags.get(TAG + "run_dir")
    fs, p = filesystem(run_dir)
    found = ckpt.latest_complete(fs, p)
    if not found:
        raise LookupError(f"run {run.info.run_name} has no complete checkpoint under {run_dir}")
    return found


def load_model(checkpoint_dir: str) -> tuple[nn.Module, JobSpec, ckpt.Meta]:
    """Build the family's model from a checkpoint's spec and load its consolidated weights."""
    directory = Path(checkpoint_dir)
    meta = ckpt.read_meta(directory)
    spec = parse_job(meta.spec)
    model = MODELS[spec.family].build(spec.model)
    model.load_state_dict(ckpt.load_weights(directory), strict=True)
    return model.eval(), spec, meta


def export(checkpoint_dir: str, fmt: str, out: Path) -> list[str]:
    """Write the checkpoint's model to `out` in format `fmt`; returns the files written."""
    model, spec, meta = load_model(checkpoint_dir)
    family = MODELS[spec.family]
    formats = ["safetensors", *family.exports]
    if fmt not in formats:
        raise ValueError(f"--format {fmt!r}: family {spec.family} exports {', '.join(formats)}")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        shutil.copyfile(Path(checkpoint_dir) / ckpt.WEIGHTS, out / ckpt.WEIGHTS)
        (out / "shipyard.json").write_text(json.dumps(
            {"family": spec.family, "model": spec.to_dict()["model"], "step": meta.step,
             "format_version": meta.format_version}, indent=1))
    else:
        family.exports[fmt](model, spec.model, out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
