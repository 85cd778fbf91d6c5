"""A small minGRU LM, trained briefly on standard-library code, beats a bigram model on held-out
files."""
import math
import time

import numpy as np
import torch

from shipyard_models.minrnn import FAMILY, Config, DataConfig

STEPS, BATCH, LR = 250, 16, 3e-3


def bigram_bits_per_byte(train_u8: np.ndarray, tokens_BT: np.ndarray) -> float:
    """Add-one smoothed bigram counts from the train split, scored on the given windows."""
    train = np.asarray(train_u8, dtype=np.int64)
    counts = np.ones((256, 256))
    np.add.at(counts, (train[:-1], train[1:]), 1)
    log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
    return float(-log_p[tokens_BT[:, :-1], tokens_BT[:, 1:]].mean() / math.log(2))


def test_short_training_beats_the_bigram_baseline_on_held_out_files(tmp_path):
    torch.manual_seed(0)
    cfg = Config(cell="mingru", dim=128, depth=2, mlp_ratio=2.0)
    train, val = FAMILY.datasets(cfg, DataConfig(seq_len=128, max_bytes=3_000_000), tmp_path)
    every = max(1, len(val) // 64)
    val_batch = {"tokens": torch.stack([val[i]["tokens"] for i in range(0, every * 64, every)])}
    bigram = bigram_bits_per_byte(train.data, val_batch["tokens"].numpy())

    model = FAMILY.build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(STEPS):
        for group in opt.param_groups:  # 20-step warm-up, then linear decay to 10%
            group["lr"] = LR * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / STEPS)
        idx = torch.randint(0, len(train), (BATCH,), generator=gen).tolist()
        batch = {"tokens": torch.stack([train[i]["tokens"] for i in idx])}
        loss, _ = FAMILY.loss(model, batch, step, STEPS)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        bpb = FAMILY.evaluate(model, val_batch)["bits_per_byte"].item()
    print(f"held-out bits/byte: minGRU LM {bpb:.3f} vs add-one bigram {bigram:.3f} "
          f"({STEPS} steps in {seconds:.1f} s)")
    assert bpb < bigram
