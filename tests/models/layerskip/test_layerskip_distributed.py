"""Layer dropout under DDP and FSDP2 (gloo, 2 processes): a layer that drops every sample on
one rank (and one that drops every sample on all ranks) still runs, on a batch of 0 rows, so
DDP's reducer sees every parameter and FSDP's per-block all-gathers / reduce-scatters run on
every rank; the gradients equal the single-process average over the ranks' batches."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shipyard_models.layerskip import FAMILY, Config, build, recipe

WORLD, STEP, TOTAL = 2, 3, 10
CFG = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=48,
           p_max=1.0, dropout_schedule="constant", early_exit_curriculum="rotational",
           rotation_interval=2)
SEEDS = (100, 108)  # per-rank dropout streams: layers 1 and 2 each empty on one rank only


def keep_masks(seed: int) -> torch.Tensor:
    """The [L, 1] keep mask the model will draw with this seed (batch of one row per rank)."""
    torch.manual_seed(seed)
    probs = torch.tensor(recipe.drop_probs(Config(**CFG), STEP, TOTAL))
    return torch.rand(4, 1) >= probs[:, None]


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (WORLD, 9), generator=torch.Generator().manual_seed(0))


def reference_grads() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build(Config(**CFG)).train()
    for rank in range(WORLD):
        torch.manual_seed(SEEDS[rank])
        loss, _ = FAMILY.loss(model, {"tokens": tokens()[rank:rank + 1]}, STEP, TOTAL)
        (loss / WORLD).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        want = reference_grads()
        batch = {"tokens": tokens()[rank:rank + 1]}
        from torch.nn.parallel import DistributedDataParallel
        torch.manual_seed(0)
        model = build(Config(**CFG)).train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        torch.manual_seed(SEEDS[rank])
        loss, _ = FAMILY.loss(ddp, batch, STEP, TOTAL)
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)

        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = build(Config(**CFG)).train()
        for unit in FAMILY.shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        torch.manual_seed(SEEDS[rank])
        loss, _ = FAMILY.loss(model, batch, STEP, TOTAL)
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), want[name], atol=1e-6, rtol=1e-5,
                                       msg=name)
        model.eval()
        with torch.no_grad():
            metrics = FAMILY.evaluate(model, batch)
        assert metrics["agree/l3"].item() == 1.0
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_layer_dropout_gradients_under_ddp_and_fsdp_equal_the_single_process_average():
    masks = [keep_masks(seed)[:, 0] for seed in SEEDS]
    assert not masks[0][3] and not masks[1][3]  # p = 1: the last layer is empty on every rank
    assert all(masks[0][l] != masks[1][l] for l in (1, 2))  # empty on one rank only
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
