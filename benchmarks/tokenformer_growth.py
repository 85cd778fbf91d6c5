"""TokenFormer progressive growth vs training the big model from scratch.

Claim (Wang et al. 2024, "TokenFormer", arXiv:2410.23168, Sec. 4.1): a model grown from a
trained smaller one by appending parameter tokens reaches the perplexity of the same size trained
from scratch at a fraction of the cost (at 1.4B: about a tenth of the per-stage cost, about a
third overall). Goal here: G reaches B1's final validation loss with at most half of B1's FLOPs,
all stages counted.

Per seed, on byte windows of the standard library's source, with the same batches in the same
order and the same peak learning rate for all:

* S  the small model, N1 steps;
* G  S grown to `factor` times its parameter tokens in every Pattention layer by `split`
     growth (each token becomes `factor` copies with value / factor plus zero-sum noise, stored
     under the layer's value_scale / factor, tau times sqrt(factor): exact, and tau ends at the
     released code's sqrt(n); growth.py), Adam's moments split alike and its step count kept,
     then trained N2 more steps;
* G_zero the same with the paper's zero-key growth (zero keys, small random values, moments
     zero-padded, tau fixed): the issue's recipe, kept as a contender (`--inits` picks methods);
* B1 the big size from scratch for N1 steps: the same total steps as S (below);
* B2 S simply continued, N2 more steps at the small size (the control: what the small stage
     buys without growth).

B1's length is the paper's protocol. Every model it trains from scratch, small or big, sees the
same 300B tokens; the grown model adds 30B per stage on top of its small model's 300B, and its
"about a third overall" is that sum against the from-scratch 1.4B's 300B (in parameter-tokens:
124M x 300B + (354M + 757M + 1.4B) x 30B = 0.27 of 1.4B x 300B), its "a tenth" one stage's 30B
against 300B. So B1 gets S's N1 steps, and G (N1 small + N2 big steps) takes more steps than B1
but fewer FLOPs. `--b1-steps total` trains B1 for G's N1 + N2 steps instead: then G would have to
match B1 at an equal step count, i.e. a small model's steps would have to teach as much as a big
one's (the earlier runs, 0/3 seeds: README, benchmarks/results/tokenformer_growth_b1_total.json).

Why this size. Growth can only save what the small stage saves: G's small stage alone costs
r of B1 (r * N1 / (N1 + N2) with `--b1-steps total`), r = (FLOPs of a small step) / (FLOPs of a
big one). Per token and
layer (`flops_per_token`) the Pattention layers cost 4D(4 n_qkv + n_ffn), token-token attention
4TD and the tied head 2VD per model, so the shares do not depend on the width D: growth shrinks
r only where the Pattention layers dominate the big model's FLOPs, as they do at the paper's
sizes. The paper keeps the width (768) and grows the parameter tokens 576 -> 8620 (15x, 124M ->
1.4B parameters, 11x). Here: width 32, 2 layers, T = 64 bytes, 16 / 64 tokens grown x16 to
256 / 1024; 24.6k -> 270k parameters (11x, the embedding is shared), Pattention 0.94 of the big
model's FLOPs (0.50 of the small model's), r = 0.12. The small model has fewer parameter tokens
than its width (n / D = 0.5 for Q/K/V/O; the paper's 0.75), as the paper's does; the big one many
more (8 and 32; the paper's 11). Earlier sizes (README): width 64 with 8 / 32 tokens x8 (r = 0.30,
a small model whose attention projections have rank 8 of 64) and 16 / 64 tokens x4 at T = 128
(r = 0.45). Stage budgets: N1 = 3000 steps (B1's too) and N2 = 1140 = 0.38 N1, the longest
grown stage whose whole run stays within the goal: G costs r + 0.38 = 0.498 of B1, so if G
reaches B1's final loss at all, it meets the goal. (The paper's three grown stages are 0.3 of its
small model's budget, `--n2 900`; one stage is a tenth, `--n2 300`.)

Learning rate (the platform's warm-up + cosine-to-10% schedule): with `--schedule stages` (the
default, what a multi-stage job does, since each stage is its own run) S runs one schedule over
N1 steps and G and B2 a new one over N2 steps (with a warm-up again); with `--schedule global`
S, G and B2 follow one schedule over N1 + N2 steps. B1 always runs one over its own length. With
`--schedule wsd` (warmup-stable-decay) nothing decays before growth: S stays at the peak after its
warm-up, G and B2 decay from the peak over their N2 steps without a second warm-up, and B1 stays
at the peak until its last N2 steps and then decays alike. (In a job spec: the small stage
`lr_schedule: constant`, the grown stage `warmup_steps: 0`.)
Validation loss on fixed held-out batches, every `eval_every_small` steps in the small stage and
every `eval_every` steps after it. FLOPs are analytic (`flops_per_token`: forward + backward = 3x
forward, per token of the batch). G's cost to reach B1's final validation loss is counted at the
first evaluation where G's loss is at or below it, with and without the small stage. Runs
in-process with the family's own code (what the platform's `grow` stage does, minus Ray); one
torch thread.

Figures (benchmarks/results/tokenformer_growth.json), means over seeds:
  pattention_flops_share     the Pattention layers' share of the big model's FLOPs per token
                             (`_small`: of the small model's)
  flops_ratio_small_over_big r above: FLOPs of a small step / a big one
  reached_target             fraction of seeds where G reaches B1's final validation loss
  flops_fraction_of_scratch  G's FLOPs to reach it, all stages counted / B1's total FLOPs
                             (null when G never reaches it)
  flops_fraction_stage_only  the same without the small stage
  steps_to_target            G's total steps (both stages) at that point
  growth_max_logit_change    max |logit change| at growth, float32, over all seeds
  growth_init                G's growth method
  b1_steps                   B1's length (N1, or N1 + N2 with `--b1-steps total`)
  final_val_{S,G,B1,B2}      final validation losses (nats per byte)
  val_B1_at_G_flops          B1's loss once it has spent what G's whole run costs
  flops_fraction_{G,B2}_total  G's and B2's whole runs / B1's FLOPs
  B2_reached_target          the same as reached_target for B2 (if B2 gets there as cheaply as
  B2_flops_fraction_of_scratch  G, growth is not what made it)
  val_G_at_B2_flops          G's loss once it has spent B2's total FLOPs (linear interpolation
                             between evaluations), to hold against final_val_B2
  G_beats_B2_at_equal_flops  fraction of seeds where that loss is below B2's final loss
  ..._zero                   the G figures again for G_zero (zero-key growth)
  wall_seconds               the whole run
Curves (against FLOPs and, zoomed, the grown stage by step) go to benchmarks/results/tokenformer_growth.png.

Usage: python benchmarks/tokenformer_growth.py [--quick] [--schedule global] [--seeds N]
       [--b1-steps total] [--inits split,zero] [--dim D --n-layers L --qkv-tokens Q --ffn-tokens F --factor K
        --seq-len T --batch B --n1 N1 --n2 N2 ...] [--device cuda]  ->  benchmarks/results/tokenformer_growth.json
(63 min measured with --inits split on one thread with the test suite on the other core;
--quick: one seed, N1 = 1000, N2 = 300, ~5 min).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    from shipyard_models.tokenformer import FAMILY, Config, DataConfig, flops_per_token, grow
    from shipyard_models.tokenformer.growth import INITS
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "models"))
    from shipyard_models.tokenformer import FAMILY, Config, DataConfig, flops_per_token, grow
    from shipyard_models.tokenformer.growth import INITS

FULL = dict(seeds=[0, 1, 2], dim=32, n_layers=2, n_heads=4, qkv_tokens=16, ffn_tokens=64, factor=16,
            n1=3000, n2=1140, batch=32, seq_len=64, lr=3e-3, warmup=30, eval_every_small=150,
            eval_every=30, val_batches=8, max_bytes=8_000_000, device="cpu")
QUICK = dict(FULL, seeds=[0], n1=1000, n2=300, eval_every_small=100, eval_every=30, val_batches=4,
             max_bytes=3_000_000)
OVERRIDES = {"dim": int, "n_layers": int, "qkv_tokens": int, "ffn_tokens": int, "factor": int,
             "seq_len": int, "batch": int, "n1": int, "n2": int, "eval_every": int,
             "eval_every_small": int, "max_bytes": int}
"""Settings that `--name value` replaces (for probing other sizes; the defaults are FULL's)."""


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """The platform's schedule (parallelize.lr_at): linear warm-up, cosine to 10%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pattention_share(cfg: Config, seq_len: int) -> float:
    """The Pattention layers' part of `flops_per_token` (the rest: token-token attention, head)."""
    pattention = 3.0 * cfg.n_layers * 2 * (4 * cfg.qkv_tokens * 2 * cfg.dim + cfg.ffn_tokens * 2 * cfg.dim)
    return pattention / flops_per_token(cfg, seq_len)


class Run:
    """A model, its AdamW (the platform's hyperparameters), and its validation curve."""

    def __init__(self, model, opt=None):
        self.model = model
        self.opt = opt or torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
        self.curve: list[tuple[int, float]] = []

    def step(self, batch, step: int, mode: dict, schedule: str) -> None:
        """One AdamW step at `schedule`'s learning rate (`--schedule`: stages, global or wsd)."""
        n1, total, peak = mode["n1"], mode["n1"] + mode["n2"], mode["lr"]
        if schedule == "global":
            lr = lr_at(step, total, peak, mode["warmup"])
        elif schedule == "wsd" and step < n1:  # warm-up, then the peak until growth: no decay to undo
            lr = peak * min(1.0, (step + 1) / mode["warmup"])
        elif schedule == "wsd":  # the grown stage decays from the peak (a warm-up only if asked)
            lr = lr_at(step - n1, mode["n2"], peak, mode.get("warmup_grown", 0))
        elif step < n1:
            lr = lr_at(step, n1, peak, mode["warmup"])
        else:
            lr = lr_at(step - n1, mode["n2"], peak, mode["warmup"])
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
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


def first_at_or_below(curve: list[tuple[int, float]], target: float, after: int = -1) -> int | None:
    """The first evaluated step after `after` whose validation loss is at or below `target`."""
    return next((st for st, v in curve if st > after and v <= target), None)


def loss_at(curve: list[tuple[int, float]], step: float) -> float:
    """Validation loss at `step`, linearly interpolated between the two evaluations around it."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    raise ValueError(f"step {step} is outside the curve ({curve[0][0]}..{curve[-1][0]})")


def configs(mode: dict) -> tuple[Config, Config]:
    """The small model's config and the big one's (`factor` times the parameter tokens)."""
    small = Config(dim=mode["dim"], n_layers=mode["n_layers"], n_heads=mode["n_heads"],
                   qkv_tokens=mode["qkv_tokens"], ffn_tokens=mode["ffn_tokens"], max_seq_len=mode["seq_len"])
    return small, dataclasses.replace(small, qkv_tokens=small.qkv_tokens * mode["factor"],
                                      ffn_tokens=small.ffn_tokens * mode["factor"])


def load_data(mode: dict, tmp: Path):
    """The training windows and fixed validation batches (on `mode["device"]`) spread over the
    whole held-out split."""
    train_set, val_set = FAMILY.datasets(Config(max_seq_len=mode["seq_len"]),
                                         DataConfig(seq_len=mode["seq_len"], max_bytes=mode["max_bytes"]), tmp)
    every = max(1, len(val_set) // (mode["val_batches"] * mode["batch"]))
    idx = list(range(0, len(val_set), every))[:mode["val_batches"] * mode["batch"]]
    val_batches = [{"tokens": torch.stack([val_set[i]["tokens"] for i in idx[k:k + mode["batch"]]]).to(
                    mode["device"])} for k in range(0, len(idx), mode["batch"])]
    return train_set, val_batches


def batches(seed: int, mode: dict, train_set):
    """`batch(step)`: the seed's training batch for a step, the same for every run of that seed."""
    order = torch.Generator().manual_seed(1000 + seed)
    picks = [torch.randint(0, len(train_set), (mode["batch"],), generator=order).tolist()
             for _ in range(mode["n1"] + mode["n2"])]
    return lambda step: {"tokens": torch.stack([train_set[i]["tokens"] for i in picks[step]]).to(mode["device"])}


def one_seed(seed: int, mode: dict, train_set, val_batches, log) -> dict:
    small_cfg, big_cfg = configs(mode)
    m = (mode["factor"] - 1)
    n1, n2 = mode["n1"], mode["n2"]
    b1_steps = b1_length(mode)
    batch = batches(seed, mode, train_set)

    def evaluated(step):  # sparse in the long small stage, dense where G and B2 race to the target
        every = mode["eval_every_small"] if step <= n1 else mode["eval_every"]
        return step % every == 0 or step in (n1, n1 + n2)

    change: dict[str, float] = {}  # growth method -> max |logit change| at growth
    torch.manual_seed(seed)  # built on the CPU, then moved: the same weights on any device
    s = Run(FAMILY.build(small_cfg).to(mode["device"]))
    torch.manual_seed(seed)
    b1 = Run(FAMILY.build(big_cfg).to(mode["device"]))
    for run in (s, b1):
        run.evaluate(0, val_batches)
    grown: dict[str, Run] = {}  # growth method -> G run
    t0 = time.perf_counter()
    for step in range(n1 + n2):
        if step == n1:  # branch G off S for each growth method, then S continues as B2
            probe = val_batches[0]["tokens"][:, :-1]
            for init in mode["inits"]:
                g_model = copy.deepcopy(s.model)
                g_opt = torch.optim.AdamW(g_model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
                g_opt.load_state_dict(copy.deepcopy(s.opt.state_dict()))
                with torch.no_grad():
                    before = g_model.eval()(probe)
                    grow(g_model, qkv_tokens=small_cfg.qkv_tokens * m, ffn_tokens=small_cfg.ffn_tokens * m,
                         seed=seed, init=init, optimizer=g_opt)
                    change[init] = (g_model(probe) - before).abs().max().item()
                grown[init] = Run(g_model, g_opt)
                grown[init].curve = list(s.curve)
        x = batch(step)
        for run in (s, *grown.values()):
            run.step(x, step, mode, mode["schedule"])
        if step < b1_steps:
            b1.step(x, step, *b1_schedule(mode))
        if evaluated(step + 1):
            runs = [("S/B2", s)] + [("B1", b1)] * (step < b1_steps) + [
                (_label(init, mode), run) for init, run in grown.items()]
            losses = {name: run.evaluate(step + 1, val_batches) for name, run in runs}
            log(f"seed {seed} step {step + 1:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
                + f"  ({time.perf_counter() - t0:.0f} s)")

    f_small, f_big = (flops_per_token(c, mode["seq_len"]) * mode["batch"] * mode["seq_len"]
                      for c in (small_cfg, big_cfg))
    target = b1.curve[-1][1]
    b1_flops = b1_steps * f_big
    b2_hit = first_at_or_below(s.curve, target)
    out = {
        "seed": seed, "target": target, "final_S": next(v for st, v in s.curve if st == n1),
        "final_B1": target, "final_B2": s.curve[-1][1], "B2_reached": b2_hit is not None,
        "curves": {"S": [c for c in s.curve if c[0] <= n1], "B1": b1.curve,
                   "B2": [c for c in s.curve if c[0] >= n1]},
        "flops_small_per_step": f_small, "flops_big_per_step": f_big, "growth": {},
    }
    if b2_hit:
        out.update(B2_flops=b2_hit * f_small / b1_flops)
    for init, g in grown.items():
        g_hit = first_at_or_below(g.curve, target, after=n1)
        g_at_b2_flops = loss_at(g.curve, n1 + n2 * f_small / f_big)  # G's loss once it has spent B2's FLOPs
        res = {"growth_max_logit_change": change[init], "final_G": g.curve[-1][1],
               "G_at_B2_flops": g_at_b2_flops, "G_beats_B2": g_at_b2_flops < s.curve[-1][1],
               "reached": g_hit is not None,
               "B1_at_G_flops": loss_at(b1.curve, n1 * f_small / f_big + n2)}
        if g_hit:
            res.update(steps_to_target=g_hit, flops_all=(n1 * f_small + (g_hit - n1) * f_big) / b1_flops,
                       flops_stage=((g_hit - n1) * f_big) / b1_flops)
        out["growth"][init] = res
        out["curves"][_label(init, mode)] = g.curve
    return out


def b1_length(mode: dict) -> int:
    """B1's steps: N1 (the paper's protocol, `--b1-steps small`) or N1 + N2 (`total`)."""
    return mode["n1"] if mode["b1_steps"] == "small" else mode["n1"] + mode["n2"]


def b1_schedule(mode: dict) -> tuple[dict, str]:
    """B1's schedule, over its own length: warm-up + cosine (over N1 that is what `stages` gives S),
    or with `--schedule wsd` the peak until its last N2 steps, then the decay G's grown stage has."""
    steps = b1_length(mode)
    if mode["schedule"] == "wsd":
        return {**mode, "n1": steps - mode["n2"]}, "wsd"
    return mode, "stages" if steps == mode["n1"] else "global"


def _label(init: str, mode: dict) -> str:
    """G for the first growth method of the run, G_<method> for the others."""
    return "G" if init == mode["inits"][0] else f"G_{init}"


def plot(results: list[dict], mode: dict, path: Path) -> None:
    """Validation loss against FLOPs (fraction of B1's total) and, zoomed, the grown stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"S": "tab:blue", "G": "tab:red", "B1": "tab:green", "B2": "tab:orange", "G_zero": "tab:purple",
              "G_split": "tab:brown"}
    n1 = mode["n1"]
    for r in results:
        f_small, f_big = r["flops_small_per_step"], r["flops_big_per_step"]
        b1_flops = b1_length(mode) * f_big
        per_step = {"S": lambda st: st * f_small, "B2": lambda st: st * f_small, "B1": lambda st: st * f_big}
        grown = lambda st: min(st, n1) * f_small + max(0, st - n1) * f_big  # noqa: E731
        for name, curve in r["curves"].items():
            is_g = name.startswith("G")
            curve = [(st, v) for st, v in curve if not is_g or st >= n1]  # G's start is S's curve
            label = name if r is results[0] else None
            flops = [(grown(st) if is_g else per_step[name](st)) / b1_flops for st, _ in curve]
            axes[0].plot(flops, [v for _, v in curve], color=colors[name], alpha=0.8, label=label)
            late = [(st, v) for st, v in curve if st >= n1]
            if len(late) > 1:
                axes[1].plot(*zip(*late), color=colors[name], alpha=0.8, label=label)
        for ax in axes:
            ax.axhline(r["target"], color=colors["B1"], ls=":", lw=0.8)
    axes[0].axvline(0.5, color="grey", ls="--", lw=1)
    axes[0].set_xlabel("training FLOPs / B1's total (dashed: the goal, 0.5)")
    axes[1].set_xlabel(f"step (grown stage: growth at step {n1})")
    lows = [v for r in results for c in r["curves"].values() for st, v in c if st >= n1]
    axes[0].set_ylim(min(lows) - 0.05, max(lows) + 0.6)
    for ax in axes:
        ax.set_ylabel("validation loss (nats / byte)")
        ax.legend()
    fig.suptitle(f"TokenFormer growth x{mode['factor']} after {n1} steps, {mode['n2']} grown steps "
                 f"(G: {mode['inits'][0]} growth; B1: {b1_length(mode)} steps; lr schedule {mode['schedule']}; "
                 f"{len(results)} seeds; dotted: B1's final loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps (~3 min, one thread)")
    parser.add_argument("--schedule", choices=["stages", "global", "wsd"], default="stages",
                        help="a learning-rate schedule per stage (as a multi-stage job), one for all, or "
                             "warmup-stable-decay (S at the peak, decay in the last N2 steps)")
    parser.add_argument("--b1-steps", choices=["small", "total"], default="small",
                        help="B1's length: the small stage's N1 steps, the paper's protocol (default), "
                             "or G's total N1 + N2")
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default 3 (1 with --quick)")
    parser.add_argument("--seed", type=int, help="run this one seed only (instead of --seeds)")
    parser.add_argument("--inits", default="split,zero",
                        help="growth methods (GrowArgs.init), comma-separated; the first is G, the "
                             "others G_<method> (default split,zero)")
    for name, kind in OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=f"override {name}")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the models and batches (cuda: for sizes a CPU cannot run; "
                             "float32, the default matmul precision)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenformer_growth.json")
    args = parser.parse_args()
    mode = {**(QUICK if args.quick else FULL), "schedule": args.schedule, "b1_steps": args.b1_steps,
            "device": args.device}
    mode.update({name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None})
    if args.seeds is not None:
        mode["seeds"] = list(range(args.seeds))
    if args.seed is not None:
        mode["seeds"] = [args.seed]
    mode["inits"] = args.inits.split(",")
    for init in mode["inits"]:
        if init not in INITS:
            parser.error(f"--inits: {init!r} is not a growth method; choose from {', '.join(INITS)}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_set, val_batches = load_data(mode, Path(tmp))
        results = [one_seed(seed, mode, train_set, val_batches, lambda t: print(t, flush=True))
                   for seed in mode["seeds"]]

    b2_reached = [r for r in results if r["B2_reached"]]
    mean = lambda key, rs: round(statistics.fmean(r[key] for r in rs), 4) if rs else None  # noqa: E731
    small_cfg, big_cfg = configs(mode)
    ratio = flops_per_token(small_cfg, mode["seq_len"]) / flops_per_token(big_cfg, mode["seq_len"])
    figures = {
        "quick": args.quick, "cores": os.cpu_count(), "device": args.device, "seeds": len(results),
        "seed_list": mode["seeds"],
        "schedule": args.schedule,
        "b1_steps": b1_length(mode),
        **{k: mode[k] for k in ("dim", "n_layers", "qkv_tokens", "ffn_tokens", "seq_len", "batch")},
        "factor": mode["factor"], "steps_small": mode["n1"], "steps_grown": mode["n2"],
        "growth_init": mode["inits"][0],
        "pattention_flops_share": round(pattention_share(big_cfg, mode["seq_len"]), 4),
        "pattention_flops_share_small": round(pattention_share(small_cfg, mode["seq_len"]), 4),
        "flops_ratio_small_over_big": round(ratio, 4),
    }
    for init in mode["inits"]:  # G's figures unsuffixed, the other methods' with _<method>
        per_seed = [r["growth"][init] for r in results]
        reached = [g for g in per_seed if g["reached"]]
        suffix = "" if init == mode["inits"][0] else f"_{init}"
        figures.update({
            f"reached_target{suffix}": round(len(reached) / len(results), 4),
            f"flops_fraction_of_scratch{suffix}": mean("flops_all", reached),
            f"flops_fraction_stage_only{suffix}": mean("flops_stage", reached),
            f"steps_to_target{suffix}": mean("steps_to_target", reached),
            f"growth_max_logit_change{suffix}": max(g["growth_max_logit_change"] for g in per_seed),
            f"final_val_G{suffix}": mean("final_G", per_seed),
            f"val_G{suffix}_at_B2_flops": mean("G_at_B2_flops", per_seed),
            f"G{suffix}_beats_B2_at_equal_flops": round(sum(g["G_beats_B2"] for g in per_seed) / len(results), 4),
        })
    figures.update({
        **{f"final_val_{k}": mean(f"final_{k}", results) for k in ("S", "B1", "B2")},
        "val_B1_at_G_flops": mean("B1_at_G_flops", [r["growth"][mode["inits"][0]] for r in results]),
        "flops_fraction_G_total": round((mode["n1"] * ratio + mode["n2"]) / b1_length(mode), 4),
        "flops_fraction_B2_total": round(ratio * (mode["n1"] + mode["n2"]) / b1_length(mode), 4),
        "B2_reached_target": round(len(b2_reached) / len(results), 4),
        "B2_flops_fraction_of_scratch": mean("B2_flops", b2_reached),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    labels = ["S", "B1", "B2"] + [_label(i, mode) for i in mode["inits"]]
    finals = [figures[f"final_val_{k}"] for k in ("S", "B1", "B2")] + [
        figures["final_val_G" + ("" if i == mode["inits"][0] else f"_{i}")] for i in mode["inits"]]
    print("".join(f"{k:>9}" for k in labels) + f"   final validation loss, mean of {len(results)} seed(s)")
    print("".join(f"{v:9.3f}" for v in finals))
    print(f"Pattention is {figures['pattention_flops_share']} of the big model's FLOPs; a small step costs "
          f"{figures['flops_ratio_small_over_big']} of a big one; a grown run costs "
          f"{figures['flops_fraction_G_total']} of B1's, where B1 was at {figures['val_B1_at_G_flops']}")
    for init in mode["inits"]:
        suffix = "" if init == mode["inits"][0] else f"_{init}"
        print(f"{_label(init, mode)} ({init} growth) reached B1's final loss in "
              f"{round(figures['reached_target' + suffix] * len(results))}/{len(results)} seeds; FLOPs fraction "
              f"of B1 (all stages) {figures['flops_fraction_of_scratch' + suffix]}, stage only "
              f"{figures['flops_fraction_stage_only' + suffix]}; at B2's final FLOPs "
              f"({figures['flops_fraction_B2_total']} of B1's) it is at {figures[f'val_G{suffix}_at_B2_flops']} vs "
              f"B2's {figures['final_val_B2']}")
    print(f"B2 (no growth) reached it in {len(b2_reached)}/{len(results)} seeds "
          f"(FLOPs fraction {figures['B2_flops_fraction_of_scratch']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, mode, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
