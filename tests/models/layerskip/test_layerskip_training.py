"""The paper's central claim at toy scale: on standard-library code, training with the early-exit
loss (and layer dropout) makes the early exits better language models, closer to the final
layer's predictions, than the same model trained plainly, while the final layer stays close."""
import torch

from shipyard_models.layerskip import FAMILY, Config, DataConfig

STEPS, BATCH, LR = 120, 16, 3e-3


def train(cfg: Config, train_set, val_batch) -> dict[str, float]:
    torch.manual_seed(0)
    model = FAMILY.build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        idx = torch.randint(0, len(train_set), (BATCH,), generator=gen).tolist()
        batch = {"tokens": torch.stack([train_set[i]["tokens"] for i in idx])}
        loss, _ = FAMILY.loss(model.train(), batch, step, STEPS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {k: v.item() for k, v in FAMILY.evaluate(model.eval(), val_batch).items()}


def test_early_exit_training_makes_early_layers_good_exits(tmp_path):
    base = dict(dim=64, n_layers=4, n_heads=4, mlp_hidden=160, max_seq_len=64)
    data = DataConfig(seq_len=64, max_bytes=400_000)
    layerskip = Config(**base, p_max=0.2, early_exit_curriculum="rotational",
                       rotation_interval=1, e_scale=1.0)
    plain = Config(**base, p_max=0.0, early_exit_curriculum="none")
    train_set, val = FAMILY.datasets(layerskip, data, tmp_path)
    val_batch = {"tokens": torch.stack([val[i]["tokens"] for i in range(0, 64 * 8, 8)])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the numbers repeat
    try:
        ls, pl = train(layerskip, train_set, val_batch), train(plain, train_set, val_batch)
    finally:
        torch.set_num_threads(threads)
    print({k: (round(ls[k], 3), round(pl[k], 3)) for k in sorted(ls)})
    # (observed: exit after layer 1 vs final 2.78 vs 2.79 with LayerSkip, 2.85 vs 2.71 plain)
    assert ls["exit_loss/l1"] - ls["loss"] < pl["exit_loss/l1"] - pl["loss"] - 0.05
    assert ls["exit_loss/l0"] < pl["exit_loss/l0"] - 0.15
    assert ls["agree/l1"] > pl["agree/l1"] + 0.1
    assert ls["loss"] < pl["loss"] + 0.2  # the last layer pays little
