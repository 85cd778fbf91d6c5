"""Retention (`checkpoint.keep` + `checkpoint.best_metric`): the N newest complete checkpoints and
the best one stay; incomplete leftovers older than the newest complete one go.

`prune` is exercised on real checkpoint-shaped directories on disk and in moto's S3, and end to end
in a real 2-worker run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.storage import filesystem

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"


def make_checkpoint(fs: pafs.FileSystem, run_dir: str, step: int, val_loss: float | None,
                    complete: bool = True) -> str:
    path = f"{run_dir}/{ckpt.dir_name(step)}"
    fs.create_dir(path, recursive=True)
    meta = json.dumps({"step": step, "metrics": {} if val_loss is None else {"val/loss": val_loss}}).encode()
    with fs.open_output_stream(f"{path}/{ckpt.META}") as f:
        f.write(meta)
    if complete:
        manifest = {"format_version": ckpt.FORMAT_VERSION, "step": step, "files": {ckpt.META: len(meta)}}
        with fs.open_output_stream(f"{path}/{ckpt.MANIFEST}") as f:
            f.write(json.dumps(manifest).encode())
    return path


def names(fs: pafs.FileSystem, run_dir: str) -> list[int]:
    infos = fs.get_file_info(pafs.FileSelector(run_dir))
    return sorted(int(i.base_name[len(ckpt.PREFIX):]) for i in infos if i.base_name.startswith(ckpt.PREFIX))


def layout(fs, run_dir):
    """Complete checkpoints at steps 10..60 (the best val/loss is at 20 for min, 50 for max), an
    incomplete leftover at 35 and an incomplete one at 70, newer than every complete one."""
    losses = {10: 3.0, 20: 1.0, 30: 2.5, 40: 2.0, 50: 4.0, 60: 1.5}
    for step, loss in losses.items():
        make_checkpoint(fs, run_dir, step, loss)
    make_checkpoint(fs, run_dir, 35, 0.1, complete=False)  # an upload that stopped half-way
    make_checkpoint(fs, run_dir, 70, 0.1, complete=False)  # newer than every complete one: in flight?


@pytest.mark.parametrize("mode,best", [("min", 20), ("max", 50)])
def test_prune_keeps_newest_and_best_on_disk(tmp_path, mode, best):
    fs, run_dir = pafs.LocalFileSystem(), str(tmp_path / "run")
    layout(fs, run_dir)
    deleted = ckpt.prune(fs, run_dir, keep=2, best_metric="val/loss", best_mode=mode)
    kept = {best, 50, 60, 70}
    assert names(fs, run_dir) == sorted(kept)
    assert len(deleted) == 8 - len(kept)


def test_prune_without_metric_and_ignoring_unscored(tmp_path):
    fs, run_dir = pafs.LocalFileSystem(), str(tmp_path / "run")
    layout(fs, run_dir)
    make_checkpoint(fs, run_dir, 65, None)  # no metric recorded: kept only as one of the newest
    ckpt.prune(fs, run_dir, keep=1, best_metric="val/acc")  # nobody has val/acc: newest only
    assert names(fs, run_dir) == [65, 70]


def test_prune_in_s3(aws_env):
    fs, root = filesystem("s3://shipyard/prune-test")
    layout(fs, root)
    ckpt.prune(fs, root, keep=1, best_metric="val/loss", best_mode="min")
    assert names(fs, root) == [20, 60, 70]
    assert ckpt.latest_complete(fs, root).endswith(ckpt.dir_name(60))


@pytest.mark.slow
def test_run_keeps_two_newest_and_the_best(ray_cluster):
    # best_mode max on val/loss: the worst checkpoint is "best", which is never one of the newest
    # in a run whose loss falls, so the test sees all three kinds of survivor.
    spec = load_job(JOB, ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000",
                          "train.steps=10", "train.batch_size=8", "train.log_every=1", "train.eval_every=2",
                          "train.eval_batches=2", "train.checkpoint_every=2", "train.warmup_steps=0",
                          "checkpoint.keep=2", "checkpoint.best_metric=val/loss", "checkpoint.best_mode=max"])
    records: list[dict] = []
    result = run_job(spec, on_record=records.append, quiet=True)
    assert result.status == "FINISHED"
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [2, 4, 6, 8, 10]
    worst = max(val, key=val.get)
    fs, run_dir = filesystem(str(Path(result.checkpoint).parent))
    assert names(fs, run_dir) == sorted({worst, 8, 10})
    for step in names(fs, run_dir):
        assert ckpt.read_manifest(fs, f"{run_dir}/{ckpt.dir_name(step)}") is not None
