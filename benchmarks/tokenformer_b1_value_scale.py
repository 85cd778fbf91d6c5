"""A fairness check for benchmarks/tokenformer_growth.py: B1 (the big model from scratch, N1 steps, the
benchmark's batches and schedule) with every Pattention layer's value_scale set to SCALE at init and its
stored values divided by it (the same function; Adam then moves the values at SCALE of the learning
rate, as split growth's value_scale 1 / k does for G's).

With DECAY, B1 runs the `wsd` schedule instead (warm-up, the peak learning rate, then cosine to 10%
over its last DECAY steps: the shape G has under `--schedule wsd`); SCALE 1 leaves values as they are.
With PEAK, that peak learning rate instead of the benchmark's 3e-3.

Usage: python benchmarks/tokenformer_b1_value_scale.py SEED SCALE [DECAY [PEAK]]  (prints the validation
loss every 500 steps; seed 2, SCALE 0.0625: 1.3236 after 3000 steps against B1's 1.342, ~25 min sharing
the CPU; seed 2, SCALE 1, DECAY 1140: 1.2943, 14 min)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenformer_growth as bench  # noqa: E402

from shipyard_models.tokenformer import FAMILY  # noqa: E402
from shipyard_models.tokenformer.model import Pattention  # noqa: E402


def main() -> None:
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    seed, scale = int(sys.argv[1]), float(sys.argv[2])
    decay = int(sys.argv[3]) if len(sys.argv) >= 4 else 0
    mode = {**bench.FULL, "schedule": "wsd" if decay else "stages"}
    if len(sys.argv) == 5:
        mode["lr"] = float(sys.argv[4])
    torch.set_num_threads(1)
    train_set, val = bench.load_data(mode, Path(tempfile.mkdtemp()))
    batch = bench.batches(seed, mode, train_set)
    _, big = bench.configs(mode)
    torch.manual_seed(seed)  # B1's initial weights, as the benchmark draws them
    model = FAMILY.build(big)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Pattention):
                mod.value_tokens.div_(scale)
                mod.value_scale.fill_(scale)
    run = bench.Run(model)
    t0 = time.perf_counter()
    steps = mode["n1"]  # B1's length; with DECAY its schedule decays over the last DECAY steps, as G's
    b1_mode, schedule = bench.b1_schedule({**mode, "b1_steps": "small", "n2": decay or mode["n2"]})
    for step in range(steps):
        run.step(batch(step), step, b1_mode, schedule)
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(step + 1, round(run.evaluate(step + 1, val), 4), f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
