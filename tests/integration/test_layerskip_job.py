"""LayerSkip through the platform: its curriculum and layer dropout survive a stop and resume
exactly (2 DDP workers), the checkpoint records the curriculum state, and `shipyard export
--format hf` writes a Hugging Face directory that loads back to the same weights.

Tolerance as in test_resume.py: a correct resume is bit-for-bit identical on CPU; we allow 1e-6.
Layer dropout draws from the per-rank RNG, so a resume that failed to restore it would change the
dropped layers and move the loss by far more.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shipyard.cli import main
from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard_models.layerskip import load_hf, recipe

JOB = Path(__file__).resolve().parents[2] / "jobs" / "layerskip" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_hidden=64",
        "model.p_max=0.5", "data.seq_len=32", "data.max_bytes=200000", "train.steps=6", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=6", "train.eval_batches=1", "train.checkpoint_every=0",
        "train.warmup_steps=0", "tracking.experiment=layerskip-test"]
STOP = 3


@pytest.mark.slow
def test_layerskip_stop_resume_is_exact_and_exports_to_hf(ray_cluster, tmp_path, capsys):
    spec = load_job(JOB, TINY)
    straight: list[dict] = []
    full = run_job(spec, on_record=straight.append, quiet=True)
    assert full.status == "FINISHED"

    first = run_job(spec, stop_at=STOP, quiet=True)
    meta = ckpt.read_meta(Path(first.checkpoint))
    assert meta.curriculum == recipe.curriculum_state(spec.model, STOP, spec.train.steps)
    resumed: list[dict] = []
    second = run_job(spec, resume=(first.run_id, first.run_name), on_record=resumed.append, quiet=True)
    assert second.status == "FINISHED"

    want = {r["step"]: r["train/loss"] for r in straight if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in resumed if "train/loss" in r}
    assert sorted(got) == list(range(STOP + 1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    a, b = ckpt.load_weights(full.checkpoint), ckpt.load_weights(second.checkpoint)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
    assert any(k.startswith("val/exit_loss/l") for k in second.metrics)

    out = tmp_path / "hf"
    assert main(["export", second.checkpoint, str(out), "--format", "hf"]) == 0
    cfg, state = load_hf(out)
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads) == (32, 4, 1)
    for k, v in state.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0)

    capsys.readouterr()
    assert main(["report", second.checkpoint]) == 0
    text = capsys.readouterr().out
    assert "per-layer exits" in text and "self-speculative" in text
    rows = [line.split() for line in text.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(rows) == 4 + 3  # one row per exit layer, one per prompt
    assert all(r[-1] == "True" for r in rows[4:])  # greedy self-speculative == autoregressive
