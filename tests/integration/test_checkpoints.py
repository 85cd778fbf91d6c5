"""What a checkpoint holds, and that an incomplete one is never used for resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shipyard.registry import MODELS
from shipyard.spec import load_job, parse_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.storage import filesystem
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.depth=1", "data.seq_len=32", "data.max_bytes=200000", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=2",
        "train.steps=6", "checkpoint.keep=0"]


@pytest.fixture(scope="module")
def stopped_run(ray_cluster):
    """A 2-worker ddp run stopped at step 4 with checkpoints at steps 2 and 4."""
    spec = load_job(JOB, TINY)
    result = run_job(spec, stop_at=4, quiet=True)
    assert result.status == "KILLED"
    return spec, result


def test_checkpoint_contents(stopped_run):
    spec, result = stopped_run
    d = Path(result.checkpoint)
    assert d.name == ckpt.dir_name(4)
    manifest = json.loads((d / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 4
    names = set(manifest["files"])
    assert {"meta.json", "model.safetensors", "rng-rank0.safetensors", "rng-rank1.safetensors",
            "state/.metadata"} <= names
    assert any(n.startswith("state/__0_") for n in names) and any(n.startswith("state/__1_") for n in names)
    meta = ckpt.read_meta(d)
    assert (meta.step, meta.batches, meta.world_size, meta.strategy) == (4, 4, 2, "ddp")
    assert parse_job(meta.spec) == spec
    model = MODELS["minrnn"].build(spec.model)
    missing, unexpected = model.load_state_dict(ckpt.load_weights(d), strict=True)
    assert not missing and not unexpected


def test_incomplete_checkpoints_are_never_picked(stopped_run, tmp_path):
    _, result = stopped_run
    run_dir = tmp_path / "run"
    shutil.copytree(Path(result.checkpoint).parent, run_dir)
    fs, _ = filesystem(str(run_dir))
    assert ckpt.latest_complete(fs, str(run_dir)).endswith(ckpt.dir_name(4))
    (run_dir / ckpt.dir_name(4) / ckpt.MANIFEST).unlink()  # a write that died before its manifest
    assert ckpt.latest_complete(fs, str(run_dir)).endswith(ckpt.dir_name(2))
    shard = next((run_dir / ckpt.dir_name(2) / "state").glob("__1_*"))
    shard.write_bytes(shard.read_bytes()[:10])  # an upload cut short
    assert ckpt.latest_complete(fs, str(run_dir)) is None


@pytest.mark.slow
def test_resume_passes_over_a_checkpoint_without_manifest(stopped_run):
    spec, result = stopped_run
    (Path(result.checkpoint) / ckpt.MANIFEST).unlink()
    events: list[dict] = []
    second = run_job(spec, resume=(result.run_id, result.run_name), on_record=events.append, quiet=True)
    assert second.status == "FINISHED"
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    # steps 3 and 4 ran twice; MLflow still has each step exactly once
    steps = [m.step for m in client().get_metric_history(result.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 7))


def test_export_by_run_or_path(stopped_run, tmp_path, capsys):
    from safetensors.torch import load_file
    from shipyard.cli import main
    _, result = stopped_run
    assert main(["export", result.run_id[:10], str(tmp_path / "a")]) == 0
    assert main(["export", result.checkpoint, str(tmp_path / "b")]) == 0
    run_dir = str(Path(result.checkpoint).parent)
    newest = ckpt.latest_complete(filesystem(run_dir)[0], run_dir)  # a later test may have resumed the run
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), ckpt.load_weights(newest)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    c = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all((c[k] == ckpt.load_weights(result.checkpoint)[k]).all() for k in c)
    assert json.loads((tmp_path / "a" / "shipyard.json").read_text())["family"] == "minrnn"
    assert main(["export", result.checkpoint, str(tmp_path / "c"), "--format", "onnx"]) == 2
    assert "family minrnn exports safetensors" in capsys.readouterr().err
