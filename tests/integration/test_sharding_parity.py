"""Every sharding strategy trains exactly like one process.

Same model, same global batch (each of 2 Ray Train workers gets half), a few AdamW steps with weight
decay: parameters and the global gradient norm must match single-process training.

Why the gradient norm as well: Adam's first steps are nearly invariant to a constant gradient
scale, so a reduction that sums instead of averages (pytorch#162338 regressed exactly that for gloo
reduce-scatter) would leave the parameters almost unchanged; the norm exposes it.

Tolerance: float32 all-reduce/reduce-scatter sum in a different order than one process does;
that perturbs gradients by ~1e-7 relative, and three Adam steps of lr 1e-2 turn that into parameter
differences far below 1e-5 (measured: ~1e-8). A real bug (wrong shard, double averaging, a missed
gradient) moves parameters by ~lr = 1e-2.
"""
from __future__ import annotations

import sys

import pytest
import ray.cloudpickle
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shipyard.spec import JobSpec, ScalingSpec, ShardingSpec, TrainSpec

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
STEPS = 3
GLOBAL_BATCH = 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(12, 24), nn.Tanh()), nn.Sequential(nn.Linear(24, 12), nn.Tanh())])
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _spec(strategy: str, stage: int, world: int, offload: bool = False) -> JobSpec:
    return JobSpec(name="parity", family="test", model=None, data=None,
                   train=TrainSpec(steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-2, weight_decay=0.1,
                                   lr_schedule="constant", grad_clip=0.0),
                   scaling=ScalingSpec(num_workers=world),
                   sharding=ShardingSpec(strategy=strategy, zero_stage=stage, offload=offload))


def _batches():
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(STEPS)]


def _train(strategy: str, stage: int, offload: bool, out: str) -> None:
    """Runs on each worker: STEPS updates on this rank's half of each global batch."""
    import torch.distributed as dist
    from shipyard.train.parallelize import parallelize
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Tiny()
    engine = parallelize(model, _spec(strategy, stage, world, offload), list(model.blocks), torch.device("cpu"))
    norms = []
    for x, y in _batches():
        loss = nn.functional.mse_loss(engine.model(x[rank::world]), y[rank::world])
        engine.backward(loss)
        norms.append(engine.step(1e-2))
    full = engine.full_state_dict()
    if rank == 0:
        save_file({**{k: v.contiguous() for k, v in full.items()}, "grad_norms": torch.tensor(norms)}, out)


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    norms = []
    for x, y in _batches():
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        opt.step()
        opt.zero_grad()
    return {**model.state_dict(), "grad_norms": torch.tensor(norms)}


@pytest.mark.slow
@pytest.mark.parametrize("strategy,stage,offload", [
    ("ddp", 0, False), ("fsdp", 0, False), ("deepspeed", 1, False), ("deepspeed", 2, False),
    ("deepspeed", 3, False), ("deepspeed", 3, True)])
def test_one_run_per_strategy_matches_single_process(ray_cluster, tmp_path, strategy, stage, offload):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    out = str(tmp_path / "params.safetensors")
    TorchTrainer(lambda cfg: _train(**cfg), train_loop_config={"strategy": strategy, "stage": stage or 1, "offload": offload, "out": out},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name=f"parity-{strategy}{stage}{'-offload' * offload}", storage_path=str(tmp_path / "ray")),
                 torch_config=TorchConfig(backend="gloo")).fit()
    got, want = load_file(out), _reference()
    assert set(got) == set(want)
    torch.testing.assert_close(got["grad_norms"], want["grad_norms"], rtol=1e-5, atol=0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=lambda m: f"{strategy}{stage} {k}: {m}")
    torch.manual_seed(0)
    init = Tiny().state_dict()
    moved = max(float((want[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3  # the steps did something for the comparison to mean anything
