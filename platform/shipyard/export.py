"""Turning a finished checkpoint back into a model: `shipyard export` and the loaders serving uses;
and the way back, `save_model`, for a model built or trained outside `shipyard run`.

A target is a checkpoint directory (local or `s3://`), a run directory, or an MLflow run (id, id
prefix or name) whose newest complete checkpoint is taken. Only the consolidated
`model.safetensors` and the JSON metadata are read.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from shipyard.registry import MODELS
from shipyard.spec import JobSpec, StorageSpec, parse_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.parallelize import DDPEngine
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


def save_model(model: nn.Module, spec: JobSpec | dict, directory: Path, step: int = 0) -> Path:
    """Write a model built or trained in this process (a notebook, a benchmark, a test fixture) as
    a complete platform checkpoint, exactly as a one-worker DDP run writes its own: manifest,
    meta.json with the spec, consolidated model.safetensors, written through a DDP engine whatever
    the spec's sharding (meta.json says "ddp"). `shipyard serve`, `export` and
    `load_model` take it like any other. `spec` is the job spec (parsed or raw) the model was built
    from; its `train:` block is kept as it is.

    The platform's writer is collective, so without a running process group this starts a
    one-process gloo group on 127.0.0.1 (and ends it, restoring the environment, afterwards);
    inside a group of more than one process it refuses, since the other ranks would not join.
    """
    spec = spec if isinstance(spec, JobSpec) else parse_job(spec)
    own_group = not dist.is_initialized()
    if not own_group and dist.get_world_size() != 1:
        raise RuntimeError(f"save_model writes from one process; this one is rank {dist.get_rank()} "
                           f"of {dist.get_world_size()}")
    saved = {}
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        engine = DDPEngine(model, spec, torch.device("cpu"))  # whatever spec.sharding says
        ckpt.write(Path(directory), engine, ckpt.Meta(step=step, batches=0, family=spec.family,
                                                      strategy="ddp", world_size=1,
                                                      spec=spec.to_dict()), rank=0)
    finally:
        if own_group:
            dist.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return Path(directory)


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
