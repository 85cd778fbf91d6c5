"""A NaN/inf loss stops the run naming the step, or (train.nonfinite: skip) is dropped.

Two real causes, no injected exceptions:
- divergence: AdamW at lr 1e30 on the minRNN job turns the loss NaN within a few steps (real Ray
  Train, 2 workers, a checkpoint every step); the run fails naming the step and the checkpoint
  of the step before stays complete and loadable;
- a poisoned sample: a NaN in the training data of a small regression family, fed through the
  real DDP / FSDP2 / DeepSpeed engines in a one-process gloo group (`train_step`, the loop's own
  step function). A skipped step must leave weights and optimizer state exactly as they were:
  training on [b0, poisoned, b1] must equal training on [b0, b1].
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job
from shipyard.train.loop import train_step
from shipyard.train.parallelize import parallelize
from shipyard_models.family import Family

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"
TINY = ["model.dim=32", "model.depth=2", "model.mlp_ratio=2.0", "data.seq_len=32", "data.max_bytes=300000",
        "train.steps=12", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=1", "train.warmup_steps=0", "checkpoint.keep=0",
        "train.lr=1.0e30"]


@pytest.mark.slow
def test_diverging_run_fails_naming_the_step_and_keeps_the_last_checkpoint(ray_cluster):
    spec = load_job(JOB, TINY)
    result = run_job(spec, quiet=True)
    assert result.status == "FAILED"
    message = str(result.error)
    found = re.search(r"(?:loss is not finite|gradient norm is \S+) at step (\d+)", message)
    assert found, message
    bad = int(found.group(1))
    assert 1 < bad <= spec.train.steps
    assert f"last complete checkpoint is from step {bad - 1}" in message
    # The checkpoint before the bad step is complete and its weights load (safetensors) and are finite.
    assert result.checkpoint.endswith(ckpt.dir_name(bad - 1))
    weights = load_file(str(Path(result.checkpoint) / ckpt.WEIGHTS))
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_skip_gives_up_after_max_skipped_steps_in_a_row(ray_cluster):
    spec = load_job(JOB, [*TINY, "train.nonfinite=skip", "train.max_skipped_steps=3"])
    records: list[dict] = []
    result = run_job(spec, on_record=records.append, quiet=True)
    assert result.status == "FAILED"
    assert "non-finite for 3 steps in a row" in str(result.error), result.error
    skipped = [r["step"] for r in records if r.get("event") == "skipped"]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))


# ----------------------------------------------------------------- skipping with the real engines

class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _loss(model, batch, step, total):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"loss": loss.detach()}


FAMILY = Family(name="regression", Config=dict, DataConfig=dict, build=lambda cfg: Regression(),
                datasets=lambda *a: ([], []), loss=_loss, evaluate=lambda m, b: {},
                shard_units=lambda model: [model.body])


@pytest.fixture(scope="module")
def process_group():
    """A real one-process gloo group in the test process (what every engine needs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # what a launcher sets; DeepSpeed reads them
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    linear = torch.nn.functional.linear
    yield
    dist.destroy_process_group()
    # A ZeRO-3 engine replaces F.linear for the rest of its process ("this will persist unless
    # manually reset", says DeepSpeed); a training worker is its own process, this test is not:
    # put it back so later tests (e.g. functorch's forward-mode AD in laplace-torch) see torch's.
    torch.nn.functional.linear = linear
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _batches():
    g = torch.Generator().manual_seed(0)
    clean = [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 1, generator=g)} for _ in range(3)]
    poisoned = {"x": clean[1]["x"].clone(), "y": clean[1]["y"].clone()}
    poisoned["x"][3, 2] = float("nan")  # one corrupt feature in one sample
    return clean, poisoned


def _train(strategy: str, batches: list[dict]):
    sharding = {"ddp": ["sharding.find_unused_parameters=true"], "fsdp": ["sharding.strategy=fsdp"],
                "deepspeed": ["sharding.strategy=deepspeed", "sharding.zero_stage=3"]}[strategy]
    spec = load_job(JOB, [*TINY, *sharding, "train.lr=1.0e-2", "train.lr_schedule=constant",
                          "train.nonfinite=skip", "scaling.num_workers=1"])
    torch.manual_seed(0)
    model = FAMILY.build(None)
    engine = parallelize(model, spec, FAMILY.shard_units(model), torch.device("cpu"))
    outcomes = []
    for step, batch in enumerate(batches):
        engine.model.train()
        outcomes.append(train_step(engine, FAMILY, batch, step, len(batches), spec.train))
    return outcomes, engine.full_state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_skipped_poisoned_step_changes_nothing(process_group, strategy):
    clean, poisoned = _batches()
    outcomes, with_poison = _train(strategy, [clean[0], poisoned, clean[2]])
    assert outcomes[0] is not None and outcomes[1] is None and outcomes[2] is not None
    _, without = _train(strategy, [clean[0], clean[2]])
    assert with_poison.keys() == without.keys() and with_poison
    for k in without:
        assert torch.isfinite(with_poison[k]).all(), k
        torch.testing.assert_close(with_poison[k], without[k], rtol=0, atol=0, msg=k)
