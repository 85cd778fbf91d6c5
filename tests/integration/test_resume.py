"""A run stopped at step k and resumed ends exactly where an uninterrupted run ends.

Real Ray Train (2 workers, gloo), real MLflow (sqlite), real checkpoints on disk, for each strategy.
Compared: the training loss of every step after the resume and the final consolidated weights.

Tolerance: with a fixed strategy and world size every reduction happens in the same order and the
CPU kernels are deterministic, so a correct resume is bit-for-bit identical; we allow 1e-6 relative
for platform-dependent kernels. Anything not restored (optimizer moments, data position, RNG, the
learning-rate step) changes the loss at the 1e-3 level or more.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shipyard.cli import main
from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.tracking import client

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.depth=2", "model.mlp_ratio=2.0", "data.seq_len=32", "data.max_bytes=300000",
        "train.steps=6", "train.batch_size=8", "train.log_every=1", "train.eval_every=3",
        "train.eval_batches=2", "train.checkpoint_every=0", "train.warmup_steps=2", "checkpoint.keep=0"]
STOP = 3


def tiny(strategy: str, *extra: str):
    sharding = {"ddp": [], "fsdp": ["sharding.strategy=fsdp"],
                "deepspeed": ["sharding.strategy=deepspeed", "sharding.zero_stage=3"]}[strategy]
    return load_job(JOB, [*TINY, *sharding, *extra])


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_stop_and_resume_equals_uninterrupted(ray_cluster, strategy):
    spec = tiny(strategy)
    straight: list[dict] = []
    full = run_job(spec, on_record=straight.append, quiet=True)
    assert full.status == "FINISHED" and full.error is None

    first = run_job(spec, stop_at=STOP, quiet=True)
    assert first.status == "KILLED" and first.checkpoint.endswith(ckpt.dir_name(STOP))
    resumed_records: list[dict] = []
    second = run_job(spec, resume=(first.run_id, first.run_name), on_record=resumed_records.append, quiet=True)
    assert second.status == "FINISHED" and second.error is None

    _assert_same_ending(straight, resumed_records, full.checkpoint, second.checkpoint)
    _assert_history_has_each_step_once(second.run_id, spec.train.steps)


@pytest.mark.slow
def test_cli_stop_resume_and_runs_with_ddp(ray_cluster, capsys):
    args = [str(JOB), *TINY, "-q"]
    straight: list[dict] = []
    full = run_job(load_job(JOB, TINY), on_record=straight.append, quiet=True)

    assert main(["run", *args, "--stop-at", str(STOP)]) == 0
    mlflow = client()
    run = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "KILLED"
    assert main(["resume", run.info.run_id[:10]]) == 0
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"

    history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, "train/loss"))
    resumed = [{"step": s, "train/loss": v} for s, v in history if s > STOP]
    _assert_same_ending(straight, resumed, full.checkpoint, run.data.tags["shipyard.checkpoint"])
    _assert_history_has_each_step_once(run.info.run_id, 6)

    capsys.readouterr()
    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    assert run.info.run_id[:12] in listing and "FINISHED" in listing


def _assert_same_ending(straight, resumed, full_ckpt, resumed_ckpt):
    want, got = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(got) == list(range(STOP + 1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    a, b = ckpt.load_weights(full_ckpt), ckpt.load_weights(resumed_ckpt)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
    assert want[STOP + 1] != want[STOP]  # training moved between the compared steps


def _assert_history_has_each_step_once(run_id: str, steps: int):
    points = client().get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in points) == list(range(1, steps + 1))
