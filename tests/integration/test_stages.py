"""Multi-stage jobs (`stages:`): spec checks, checkpoint conversion between stages, and a real
grow job on Ray (FSDP2, 2 workers) that crashes in its second stage and resumes without redoing
the first.

Tolerances: growth adds exact zeros to every sum (zero keys, GeLU(0) = 0), so logits before and
after conversion agree to float32 rounding of reordered sums (~1e-7); we allow 1e-6. Optimizer
moments are copied, not recomputed: compared exactly.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from shipyard.export import load_model
from shipyard.spec import SpecError, load_job, parse_job, stage_spec
from shipyard.train import checkpoint as ckpt
from shipyard.train.parallelize import _adamw
from shipyard.train.stages import _write, convert_local, read_full_state

JOB = Path(__file__).resolve().parents[2] / "jobs" / "tokenformer" / "grow.yaml"
TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "qkv_tokens": 8, "ffn_tokens": 16, "max_seq_len": 32}


def tiny_raw(**stage_changes) -> dict:
    raw = yaml.safe_load(JOB.read_text())
    raw["model"].update(TINY_MODEL)
    raw["data"].update({"seq_len": 32, "max_bytes": 200_000})
    raw["train"].update({"batch_size": 8, "lr": 1.0e-2, "warmup_steps": 0, "log_every": 1, "eval_every": 0,
                         "eval_batches": 1, "checkpoint_every": 2})
    raw["checkpoint"] = {"keep": 0}
    raw["tracking"] = {"experiment": "stages-test"}
    raw["stages"] = [{"name": "small", "steps": 4},
                     {"name": "big", "steps": 4, "transform": "grow", "args": {"qkv_tokens": 8, "ffn_tokens": 16}}]
    for i, change in stage_changes.items():
        raw["stages"][int(i[1:])].update(change)
    return raw


def test_the_grow_job_has_three_stages_small_2x_4x():
    spec = load_job(JOB)
    sizes = [(stage_spec(spec, i).model.qkv_tokens, stage_spec(spec, i).model.ffn_tokens) for i in range(3)]
    base = sizes[0]
    assert sizes == [base, (2 * base[0], 2 * base[1]), (4 * base[0], 4 * base[1])]
    assert [s.name for s in spec.stages] == ["small", "grow2x", "grow4x"]
    assert parse_job(spec.to_dict()).stages == spec.stages  # what workers and `resume` re-read


@pytest.mark.parametrize("change,field", [
    ({"s1": {"transform": "shrink"}}, "stages[1].transform: 'shrink' is not a transform of family tokenformer; choose one of grow"),
    ({"s1": {"args": {"qkv_tokens": -2, "ffn_tokens": 4}}}, "stages[1].args"),
    ({"s1": {"args": {"qkv_token": 2}}}, "stages[1].args.qkv_token: unknown field (did you mean 'qkv_tokens'?)"),
    ({"s1": {"args": {"qkv_tokens": 8, "init": "copy"}}}, "init must be one of zero, split, got 'copy'"),
    ({"s0": {"transform": "grow"}}, "stages[0].transform: the first stage"),
    ({"s1": {"name": "small"}}, "stages[1].name: 'small' is used by an earlier stage"),
    ({"s1": {"steps": 0}}, "stages[1].steps: 0 must be at least 1"),
    ({"s1": {"optimizer": "reset"}}, "stages[1].optimizer: 'reset' (str) is not allowed; choose one of 'continue', 'fresh'"),
    ({"s1": {"train": {"lr": -1.0}}}, "stages[1]: train.lr: -1.0 must be positive"),
    ({"s1": {"train": {"lrr": 1.0}}}, "stages[1].train.lrr: unknown field"),
    ({"s1": {"train": {"steps": 9}}}, "stages[1].train.steps: set the stage's steps as stages[1].steps"),
    ({"s1": {"transform": None}}, "stages[1].args: only a stage with a transform takes arguments"),
])
def test_invalid_stages_name_the_field(change, field):
    with pytest.raises(SpecError) as e:
        parse_job(tiny_raw(**change))
    assert field in str(e.value)


def test_deepspeed_cannot_run_later_stages():
    raw = tiny_raw()
    raw["sharding"] = {"strategy": "deepspeed"}
    with pytest.raises(SpecError, match="sharding.strategy: 'deepspeed' cannot run the stages after the first"):
        parse_job(raw)
    with pytest.raises(SpecError, match="stages: expected a non-empty list"):
        parse_job({**tiny_raw(), "stages": []})


def _small_checkpoint(tmp_path: Path, spec) -> tuple[Path, torch.nn.Module]:
    """A step-4 checkpoint of stage 0 in the platform's format (DCP state, weights, meta)."""
    from shipyard.registry import MODELS
    torch.manual_seed(0)
    model = MODELS["tokenformer"].build(spec.model)
    opt = _adamw(model.parameters(), spec.train)
    for s in range(4):
        x = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(s))
        loss, _ = MODELS["tokenformer"].loss(model, {"tokens": x}, s, 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _write(tmp_path / "small", model, opt, spec, ckpt.Meta(step=4, batches=4, family="tokenformer",
                                                             strategy="ddp", world_size=2, spec={}))
    return tmp_path / "small", model


@pytest.mark.parametrize("optimizer", ["continue", "fresh"])
def test_conversion_grows_weights_and_pads_adam_moments(tmp_path, optimizer):
    spec = parse_job(tiny_raw(s1={"optimizer": optimizer}))
    small_spec, big_spec = stage_spec(spec, 0), stage_spec(spec, 1)
    source, small = _small_checkpoint(tmp_path, small_spec)
    convert_local(source, tmp_path / "big", big_spec, spec.stages[1])
    assert ckpt.read_manifest(__import__("pyarrow.fs").fs.LocalFileSystem(), str(tmp_path / "big"))
    meta = ckpt.read_meta(tmp_path / "big")
    assert (meta.step, meta.batches) == (0, 4)  # the step restarts; the data stream goes on

    big, _, _ = load_model(tmp_path / "big")
    assert big.cfg.qkv_tokens == 16 and big.blocks[0].ffn.n_tokens == 32
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(big(x), small.eval()(x), rtol=0, atol=1e-6)

    _, before = read_full_state(source, ckpt.read_meta(source), small_spec, want_optimizer=True)
    _, after = read_full_state(tmp_path / "big", meta, big_spec, want_optimizer=True)
    name = "blocks.1.ffn.key_tokens"
    if optimizer == "continue":
        assert after["state"][name]["step"] == before["state"][name]["step"] == 4
        for moment in ("exp_avg", "exp_avg_sq"):
            old, new = before["state"][name][moment], after["state"][name][moment]
            assert torch.equal(new[:16], old) and torch.equal(new[16:], torch.zeros(16, 32))
    else:
        assert after["state"][name]["step"] == 0
        assert not after["state"][name]["exp_avg"].any()


def test_split_conversion_is_exact_and_splits_adam_moments(tmp_path):
    """`init: split` through the stage transform: every token becomes two, tau grows by sqrt(2)."""
    spec = parse_job(tiny_raw(s1={"args": {"qkv_tokens": 8, "ffn_tokens": 16, "init": "split"}}))
    small_spec, big_spec = stage_spec(spec, 0), stage_spec(spec, 1)
    source, small = _small_checkpoint(tmp_path, small_spec)
    convert_local(source, tmp_path / "big", big_spec, spec.stages[1])
    big, _, _ = load_model(tmp_path / "big")
    assert float(big.blocks[0].ffn.tau) == pytest.approx(32 ** 0.5)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(big(x), small.eval()(x), rtol=0, atol=1e-6)
    meta = ckpt.read_meta(tmp_path / "big")
    _, before = read_full_state(source, ckpt.read_meta(source), small_spec, want_optimizer=True)
    _, after = read_full_state(tmp_path / "big", meta, big_spec, want_optimizer=True)
    key, value = before["state"]["blocks.1.ffn.key_tokens"], after["state"]["blocks.1.ffn.key_tokens"]
    assert torch.equal(value["exp_avg"][0::2], key["exp_avg"] / 2)
    assert torch.equal(value["exp_avg_sq"][1::2], key["exp_avg_sq"] / 4)
    v_old, v_new = before["state"]["blocks.1.ffn.value_tokens"], after["state"]["blocks.1.ffn.value_tokens"]
    assert torch.equal(v_new["exp_avg"][1::2], v_old["exp_avg"] / 2)  # stored values under value_scale / 2
    assert float(big.blocks[1].ffn.value_scale) == 0.5


def test_continue_from_a_deepspeed_checkpoint_is_refused(tmp_path):
    spec = parse_job(tiny_raw())
    source, _ = _small_checkpoint(tmp_path, stage_spec(spec, 0))
    meta = ckpt.read_meta(source)
    meta.strategy = "deepspeed"
    with pytest.raises(ValueError, match="use optimizer: fresh"):
        read_full_state(source, meta, stage_spec(spec, 0), want_optimizer=True, stage_name="big")
    weights, optim = read_full_state(source, meta, stage_spec(spec, 0), want_optimizer=False)
    assert optim is None and weights["blocks.0.ffn.key_tokens"].shape == (16, 32)


@pytest.mark.slow
def test_grow_job_crashes_in_stage_two_and_resumes_without_redoing_stage_one(ray_cluster):
    """small (4 steps) -> grow -> big (60 steps) with FSDP2 on 2 workers. A worker of the second
    stage is SIGKILLed once the driver has seen its step 3 (a real crash; failure.max_failures=0,
    so the job fails); resuming the parent run skips the finished stage and resumes the crashed
    one from its newest complete checkpoint. The workers do not wait for the driver, so the kill
    lands some steps later: 60 steps leave room for that, and the assertions take the step the
    run really resumed from.
    The second stage's first checkpoint, converted from the first stage's sharded FSDP2 state,
    computes the first stage's final logits in a fresh Ray worker."""
    import ray
    from shipyard.train.launch import run_job
    from shipyard.train.tracking import client

    raw = tiny_raw(s1={"steps": 60, "train": {"checkpoint_every": 10}})
    raw["sharding"] = {"strategy": "fsdp"}
    spec = parse_job(raw)
    records: list[dict] = []
    pids: dict[int, int] = {}

    def crash_in_stage_two(r: dict) -> None:
        records.append(r)
        if r.get("stage") == "big" and r.get("event") == "worker":
            pids[r["rank"]] = r["pid"]
        if r.get("stage") == "big" and r.get("step") == 3 and "train/loss" in r and len(pids) == 2:
            os.kill(pids[1], signal.SIGKILL)

    first = run_job(spec, on_record=crash_in_stage_two, quiet=True)
    assert first.status == "FAILED" and first.error is not None
    small_runs = {r["run_id"] for r in records if r.get("event") == "run" and r["stage"] == "small"}
    assert len(small_runs) == 1

    again: list[dict] = []
    second = run_job(spec, resume=(first.run_id, first.run_name), on_record=again.append, quiet=True)
    assert second.status == "FINISHED", second.error
    assert [r["stage"] for r in again if r.get("event") == "stage_skipped"] == ["small"]
    assert not any(r.get("stage") == "small" and "step" in r for r in again)  # stage one not redone
    resumed = [r for r in again if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["stage"] == "big", resumed
    at = resumed[0]["step"]
    assert at % 10 == 0 and at < 60, at  # a checkpoint of the crashed stage (0: the converted one)
    assert sorted(r["step"] for r in again if "train/loss" in r) == list(range(at + 1, 61))

    mlflow = client()
    parent = mlflow.get_run(second.run_id)
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["shipyard.stage"] for c in children) == ["big", "small"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id for c in children if c.data.tags["shipyard.stage"] == "small"} == small_runs
    from shipyard.export import resolve_checkpoint
    assert resolve_checkpoint(parent.info.run_id)[0] == second.checkpoint  # export/report PARENT: the last stage

    small_ckpt = next(c for c in children if c.data.tags["shipyard.stage"] == "small").data.tags["shipyard.checkpoint"]
    converted = str(Path(second.checkpoint).parent / ckpt.dir_name(0))
    assert ckpt.read_meta(Path(small_ckpt)).strategy == "fsdp"

    @ray.remote(num_cpus=1)
    def logits_in_a_fresh_worker(directory: str, tokens: torch.Tensor):
        model, spec, _ = load_model(Path(directory))
        with torch.no_grad():
            return model(tokens), spec.model.qkv_tokens

    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    (small, n_small), (big, n_big) = ray.get([logits_in_a_fresh_worker.remote(small_ckpt, x),
                                              logits_in_a_fresh_worker.remote(converted, x)])
    assert (n_small, n_big) == (8, 16)
    torch.testing.assert_close(big, small, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_deepspeed_zero3_checkpoint_converts_to_the_grown_model(ray_cluster, tmp_path):
    """save (a real ZeRO-3 run, 2 workers) -> convert (weights from the consolidated file; the
    optimizer restarts, as it must for DeepSpeed) -> load in a fresh Ray worker: same logits."""
    import ray
    from shipyard.spec import StageSpec
    from shipyard.train.launch import run_job
    from shipyard.train.stages import convert

    raw = tiny_raw()
    raw["sharding"] = {"strategy": "deepspeed", "zero_stage": 3}
    del raw["stages"]
    raw["train"].update({"steps": 2, "checkpoint_every": 0})
    spec = parse_job(raw)
    done = run_job(spec, quiet=True)
    assert done.status == "FINISHED", done.error
    assert ckpt.read_meta(Path(done.checkpoint)).strategy == "deepspeed"

    grow = StageSpec(name="big", steps=1, transform="grow", args={"qkv_tokens": 8, "ffn_tokens": 16},
                     optimizer="fresh")
    big_spec = parse_job({**raw, "sharding": {"strategy": "ddp"}, "stages": [
        {"name": "small", "steps": 1}, {k: v for k, v in grow.__dict__.items()}]})
    target = convert(done.checkpoint, str(tmp_path / "big"), stage_spec(big_spec, 1), grow)

    @ray.remote(num_cpus=1)
    def logits_in_a_fresh_worker(directory: str, tokens: torch.Tensor):
        model, _, _ = load_model(Path(directory))
        with torch.no_grad():
            return model(tokens), model.cfg.ffn_tokens

    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    (small, n_small), (big, n_big) = ray.get([logits_in_a_fresh_worker.remote(done.checkpoint, x),
                                              logits_in_a_fresh_worker.remote(target, x)])
    assert (n_small, n_big) == (16, 32)
    torch.testing.assert_close(big, small, rtol=0, atol=1e-6)
