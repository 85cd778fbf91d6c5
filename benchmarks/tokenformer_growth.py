"""TokenFormer progressive growth vs training the big model from scratch.

Claim (Wang et al. 2024, "TokenFormer", arXiv:2410.23168, Sec. 4.1): a model grown from a
trained smaller one by appending parameter tokens reaches the perplexity of the same size trained
from scratch at a fraction of the cost (at 1.4B: about a tenth of the per-stage cost, about a
third overall). Goal here: G reaches B1's final validation loss with at most half of B1's FLOPs,
all stages counted.

Per seed, on byte windows of the standard library's source, with the same batches in the same
order and the same peak learning rate for all:

* S  the small model, N1 steps;
* G  S grown (every Pattention layer to `factor` times its tokens: zero keys, small random
     values, Adam's moments zero-padded, step count kept) and trained N2 more steps;
* B1 the big size from scratch, N1 + N2 steps;
* B2 S simply continued, N2 more steps at the small size.

Learning rate (the platform's warm-up + cosine-to-10% schedule): with `--schedule stages` (the
default, what a multi-stage job does, since each stage is its own run) S runs one schedule over
N1 steps and G and B2 a new one over N2 steps (with a warm-up again), while B1 runs one over
N1 + N2; with `--schedule global` all four follow one schedule over N1 + N2 steps.
Validation loss on fixed held-out batches every `eval_every` steps. FLOPs are analytic
(`flops_per_token`: forward + backward = 3x forward, per token of the batch). G's cost to reach
B1's final validation loss is counted at the first evaluation where G's loss is at or below it,
with and without the small stage. Runs in-process with the family's own code (what the
platform's `grow` stage does, minus Ray); one torch thread.

Figures (benchmarks/results/tokenformer_growth.json), means over seeds:
  reached_target             fraction of seeds where G reaches B1's final validation loss
  flops_fraction_of_scratch  G's FLOPs to reach it, all stages counted / B1's total FLOPs
                             (null when G never reaches it)
  flops_fraction_stage_only  the same without the small stage
  steps_to_target            G's total steps (both stages) at that point
  growth_max_logit_change    max |logit change| at growth, float32, over all seeds
  final_val_{S,G,B1,B2}      final validation losses (nats per byte)
Curves are plotted to benchmarks/results/tokenformer_growth.png.

Usage: python benchmarks/tokenformer_growth.py [--quick]  ->  benchmarks/results/tokenformer_growth.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    from shipyard_models.tokenformer import FAMILY, Config, DataConfig, flops_per_token, grow
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "models"))
    from shipyard_models.tokenformer import FAMILY, Config, DataConfig, flops_per_token, grow

FULL = dict(seeds=[0, 1, 2], dim=64, n_layers=2, n_heads=4, qkv_tokens=16, ffn_tokens=64, factor=4,
            n1=300, n2=300, batch=16, seq_len=128, lr=3e-3, warmup=30, eval_every=25, val_batches=8,
            max_bytes=3_000_000)
QUICK = dict(FULL, seeds=[0], n1=120, n2=120, eval_every=20, val_batches=4, max_bytes=1_000_000)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """The platform's schedule (parallelize.lr_at): linear warm-up, cosine to 10%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Run:
    """A model, its AdamW (the platform's hyperparameters), and its validation curve."""

    def __init__(self, model, opt=None):
        self.model = model
        self.opt = opt or torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
        self.curve: list[tuple[int, float]] = []

    def step(self, batch, step: int, mode: dict, staged: bool) -> None:
        n1, total = mode["n1"], mode["n1"] + mode["n2"]
        if not staged:
            lr = lr_at(step, total, mode["lr"], mode["warmup"])
        elif step < n1:
            lr = lr_at(step, n1, mode["lr"], mode["warmup"])
        else:
            lr = lr_at(step - n1, mode["n2"], mode["lr"], mode["warmup"])
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss, _ = FAMILY.loss(self.model.train(), batch, step, mode["n1"] + mode["n2"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, step: int, val_batches) -> float:
        self.model.eval()
        loss = statistics.fmean(FAMILY.evaluate(self.model, b)["loss"].item() for b in val_batches)
        self.curve.append((step, loss))
        return loss


def one_seed(seed: int, mode: dict, train_set, val_batches, log) -> dict:
    small_cfg = Config(dim=mode["dim"], n_layers=mode["n_layers"], n_heads=mode["n_heads"],
                       qkv_tokens=mode["qkv_tokens"], ffn_tokens=mode["ffn_tokens"],
                       max_seq_len=mode["seq_len"])
    m = (mode["factor"] - 1)
    big_cfg = Config(**{**small_cfg.__dict__, "qkv_tokens": small_cfg.qkv_tokens * mode["factor"],
                        "ffn_tokens": small_cfg.ffn_tokens * mode["factor"]})
    n1, n2, every = mode["n1"], mode["n2"], mode["eval_every"]
    order = torch.Generator().manual_seed(1000 + seed)
    batches = [torch.randint(0, len(train_set), (mode["batch"],), generator=order).tolist()
               for _ in range(n1 + n2)]

    def batch(step):
        return {"tokens": torch.stack([train_set[i]["tokens"] for i in batches[step]])}

    torch.manual_seed(seed)
    s = Run(FAMILY.build(small_cfg))
    torch.manual_seed(seed)
    b1 = Run(FAMILY.build(big_cfg))
    for run in (s, b1):
        run.evaluate(0, val_batches)
    g = None
    t0 = time.perf_counter()
    for step in range(n1 + n2):
        if step == n1:  # branch G off S: grow model and optimizer, then S continues as B2
            g_model = copy.deepcopy(s.model)
            g_opt = torch.optim.AdamW(g_model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
            g_opt.load_state_dict(copy.deepcopy(s.opt.state_dict()))
            probe = val_batches[0]["tokens"][:, :-1]
            with torch.no_grad():
                before = g_model.eval()(probe)
                grow(g_model, qkv_tokens=small_cfg.qkv_tokens * m, ffn_tokens=small_cfg.ffn_tokens * m,
                     seed=seed, optimizer=g_opt)
                change = (g_model(probe) - before).abs().max().item()
            g = Run(g_model, g_opt)
            g.curve = list(s.curve)
        x = batch(step)
        for run in (s, b1) + ((g,) if g else ()):
            run.step(x, step, mode, staged=mode["schedule"] == "stages" and run is not b1)
        if (step + 1) % every == 0 or step + 1 == n1 + n2:
            losses = {name: run.evaluate(step + 1, val_batches)
                      for name, run in (("S/B2", s), ("B1", b1), ("G", g)) if run}
            log(f"seed {seed} step {step + 1:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
                + f"  ({time.perf_counter() - t0:.0f} s)")

    f_small, f_big = (flops_per_token(c, mode["seq_len"]) * mode["batch"] * mode["seq_len"]
                      for c in (small_cfg, big_cfg))
    target = b1.curve[-1][1]
    b1_flops = (n1 + n2) * f_big
    hit = next(((st, v) for st, v in g.curve if st > n1 and v <= target), None)
    out = {
        "seed": seed, "growth_max_logit_change": change, "target": target,
        "final_S": next(v for st, v in s.curve if st == n1), "final_G": g.curve[-1][1],
        "final_B1": target, "final_B2": s.curve[-1][1],
        "reached": hit is not None,
        "curves": {"S": [c for c in s.curve if c[0] <= n1], "G": g.curve, "B1": b1.curve,
                   "B2": [c for c in s.curve if c[0] >= n1]},
        "flops_small_per_step": f_small, "flops_big_per_step": f_big,
    }
    if hit:
        st = hit[0]
        out.update(steps_to_target=st, flops_all=(n1 * f_small + (st - n1) * f_big) / b1_flops,
                   flops_stage=((st - n1) * f_big) / b1_flops)
    return out


def plot(results: list[dict], mode: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"S": "tab:blue", "G": "tab:red", "B1": "tab:green", "B2": "tab:orange"}
    for r in results:
        for name, curve in r["curves"].items():
            ax.plot(*zip(*curve), color=colors[name], alpha=0.8,
                    label=name if r is results[0] else None)
    ax.axvline(mode["n1"], color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(f"TokenFormer growth x{mode['factor']} at step {mode['n1']} ({len(results)} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps (~5 min on 2 cores)")
    parser.add_argument("--schedule", choices=["stages", "global"], default="stages",
                        help="a learning-rate schedule per stage (as a multi-stage job) or one for all")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenformer_growth.json")
    args = parser.parse_args()
    mode = {**(QUICK if args.quick else FULL), "schedule": args.schedule}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(max_seq_len=mode["seq_len"])
        train_set, val_set = FAMILY.datasets(cfg, DataConfig(seq_len=mode["seq_len"], max_bytes=mode["max_bytes"]),
                                             Path(tmp))
        every = max(1, len(val_set) // (mode["val_batches"] * mode["batch"]))
        idx = list(range(0, len(val_set), every))[:mode["val_batches"] * mode["batch"]]
        val_batches = [{"tokens": torch.stack([val_set[i]["tokens"] for i in idx[k:k + mode["batch"]]])}
                       for k in range(0, len(idx), mode["batch"])]
        results = [one_seed(seed, mode, train_set, val_batches, lambda t: print(t, flush=True))
                   for seed in mode["seeds"]]

    reached = [r for r in results if r["reached"]]
    mean = lambda key, rs: round(statistics.fmean(r[key] for r in rs), 4) if rs else None  # noqa: E731
    figures = {
        "quick": args.quick, "cores": os.cpu_count(), "seeds": len(results), "schedule": args.schedule,
        "factor": mode["factor"], "steps_small": mode["n1"], "steps_grown": mode["n2"],
        "reached_target": round(len(reached) / len(results), 4),
        "flops_fraction_of_scratch": mean("flops_all", reached),
        "flops_fraction_stage_only": mean("flops_stage", reached),
        "steps_to_target": mean("steps_to_target", reached),
        "growth_max_logit_change": max(r["growth_max_logit_change"] for r in results),
        **{f"final_val_{k}": mean(f"final_{k}", results) for k in ("S", "G", "B1", "B2")},
        "flops_fraction_G_total": round((mode["n1"] * results[0]["flops_small_per_step"]
                                         + mode["n2"] * results[0]["flops_big_per_step"])
                                        / ((mode["n1"] + mode["n2"]) * results[0]["flops_big_per_step"]), 4),
    }
    print(f"{'':4}{'S':>8}{'G':>8}{'B1':>8}{'B2':>8}   final validation loss, mean of {len(results)} seed(s)")
    print(f"{'':4}" + "".join(f"{figures[f'final_val_{k}']:8.3f}" for k in ("S", "G", "B1", "B2")))
    print(f"G reached B1's final loss in {len(reached)}/{len(results)} seeds; FLOPs fraction of B1 "
          f"(all stages) {figures['flops_fraction_of_scratch']}, stage only {figures['flops_fraction_stage_only']}; "
          f"G's whole run costs {figures['flops_fraction_G_total']} of B1's")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, mode, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
