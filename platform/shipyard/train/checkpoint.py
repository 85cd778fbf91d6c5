"""Checkpoints: what goes in, how completeness is decided, how a worker restores.

One checkpoint directory (`checkpoint-<step>` under the run's storage directory):

    state/                    sharded resume state: torch.distributed.checkpoint (ddp, fsdp)
                              or DeepSpeed's own per-rank files (deepspeed)
    rng-rank<r>.safetensors   each worker's RNG state
    model.safetensors         consolidated weights for serving and export (rank 0)
    meta.json                 format version, step, data position, curriculum state, spec, strategy
    manifest.json             every file above with its size; written last

Each worker writes its files into its own local directory and hands it to `ray.train.report`,
which merges them into the checkpoint directory on storage. A checkpoint counts as complete only
if its manifest exists and every file it lists is present with the listed size, so a write or an
upload that stopped half-way is never picked for resume, whatever order files arrived in.
Nothing is ever unpickled: weights and RNG are safetensors, the rest JSON (DeepSpeed's files are
read with `weights_only=True`, see parallelize.py).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
WEIGHTS = "model.safetensors"
STATE = "state"
PREFIX = "checkpoint-"


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


@dataclass
class Meta:
    step: int
    batches: int
    """Global batches consumed: the data position (see data.py)."""
    family: str
    strategy: str
    world_size: int
    spec: dict
    curriculum: dict | None = None
    metrics: dict | None = None
    """The latest train-window and validation metrics at this step (for `checkpoint.best_metric`)."""
    format_version: int = FORMAT_VERSION
    created: float = 0.0


def write(local_dir: Path, engine, meta: Meta, rank: int) -> None:
    """Collective: every worker writes its part of a checkpoint into its own `local_dir`."""
    local_dir.mkdir(parents=True, exist_ok=True)
    engine.save(local_dir / STATE)
    save_file(_rng_state(), str(local_dir / f"rng-rank{rank}.safetensors"))
    weights = engine.full_state_dict()
    if rank == 0:
        # safetensors refuses shared storage (tied weights): store each tensor on its own.
        save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, str(local_dir / WEIGHTS),
                  metadata={"family": meta.family, "format_version": str(FORMAT_VERSION)})
        meta.created = time.time()
        (local_dir / META).write_text(json.dumps(meta.__dict__, indent=1))
    mine = {str(p.relative_to(local_dir)): p.stat().st_size for p in local_dir.rglob("*") if p.is_file()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        files: dict[str, int] = {}
        for part in everyone:
            files.update(part)
        manifest = {"format_version": FORMAT_VERSION, "step": meta.step, "files": files}
        (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    """The manifest of the checkpoint at `path` if the checkpoint is complete, else None."""
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    sizes = {os.path.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}
    if any(sizes.get(name) != size for name, size in manifest["files"].items()):
        return None
    return manifest


def latest_complete(fs: pafs.FileSystem, run_dir: str) -> str | None:
    """Path of the newest complete checkpoint under a run directory, or None."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    candidates = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                         and os.path.basename(i.path).startswith(PREFIX)), reverse=True)
    for path in candidates:
        if read_manifest(fs, path) is not None:
            return path
    return None


def prune(fs: pafs.FileSystem, run_dir: str, keep: int, best_metric: str | None = None,
          best_mode: str = "min") -> list[str]:
    """Retention (`checkpoint.keep`): delete all but the `keep` newest complete checkpoints and,
    with `best_metric`, the complete one with the best value of it; also delete incomplete
    leftovers older than the newest complete checkpoint (an upload that stopped half-way).
    Called by rank 0 after its checkpoint is on storage. Returns the deleted paths."""
    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                   and os.path.basename(i.path).startswith(PREFIX))
    complete = [p for p in paths if read_manifest(fs, p) is not None]
    if not complete:
        return []
    keep_set = set(complete[-keep:]) if keep > 0 else set(complete)
    if best_metric:
        scored = [(v, p) for p in complete if (v := _metric(fs, p, best_metric)) is not None]
        if scored:
            pick = min if best_mode == "min" else max
            keep_set.add(pick(scored, key=lambda vp: vp[0])[1])
    newest = complete[-1]
    doomed = [p for p in paths if p not in keep_set and p < newest]
    for p in doomed:
        fs.delete_dir(p)
    return doomed


def _metric(fs: pafs.FileSystem, path: str, name: str) -> float | None:
    try:
        with fs.open_input_stream(f"{path}/{META}") as f:
            value = (json.loads(f.read()).get("metrics") or {}).get(name)
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def read_meta(directory: Path) -> Meta:
    data = json.loads((directory / META).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {data.get('format_version')} is not "
                         f"{FORMAT_VERSION}, which this Shipyard reads")
    return Meta(**data)


def restore(directory: Path, engine, rank: int) -> Meta:
    """Collective: load sharded state and this worker's RNG from a local checkpoint directory."""
    meta = read_meta(directory)
    engine.load(directory / STATE)
    rng_file = directory / f"rng-rank{rank}.safetensors"
    if rng_file.exists():  # absent when resuming with more workers than saved
        _set_rng_state(load_file(str(rng_file)))
    return meta


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Consolidated weights of a checkpoint (safetensors only)."""
    return load_file(str(Path(directory) / WEIGHTS))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
