"""One-seed probes of the grown stage of benchmarks/tokenformer_growth.py: how growth settings
change where G ends.

The small model S is trained once per seed (N1 steps, the benchmark's FULL settings, its batches
and schedule) and cached; each probe grows a copy of it by `factor` with the given settings and
trains N2 steps, evaluating along the way. Much cheaper than the benchmark (no B1, B2 or second
method): ~2 min for S, ~3.5 min a probe, one thread. The benchmark is what the README's claims
rest on; these probes are how its settings were chosen (their lines go to
benchmarks/results/tokenformer_growth_probes.jsonl, one per probe).

Usage: python benchmarks/tokenformer_growth_probe.py NAME [init=split] [noise=0.1] [factor=16]
       [peak=0.003 (the peak learning rate of both stages; S is cached per peak)]
       [lr=1.0 (multiplier of the grown stage's peak)] [warm=30 (its warm-up steps)] [seed=0]
       [vscale=1.0 (learning-rate multiplier of the value tokens, by an optimizer parameter group)]
       [vramp=0 (steps over which that multiplier returns to 1; 0: it stays)]
       [kvmul=1.0 (multiplier of the key tokens' Adam second moments after growth)]
       [n2=1140 (grown steps)] [sched=stages (or global: S, G on one schedule over N1 + N2; or wsd:
        S at the peak, G decaying from it, no second warm-up unless `warm`; S is cached per schedule)]
       [rel=0 (1: noise is relative, times each layer's old value RMS)]
       [factor2=1 mid=0 restart=0 (two growths: by `factor` at N1, by `factor2` mid grown steps
        later; restart=1 gives each grown stage its own schedule, else one spans both)]
(The probes with vscale < 1 ran before split growth set each layer's value_scale to 1 / k, which
does the same inside the model: `scaled` reproduces `vk` within seed noise.)
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenformer_growth as bench  # noqa: E402

from shipyard_models.tokenformer import FAMILY, grow  # noqa: E402
from shipyard_models.tokenformer.growth import GrowArgs, _generator, copies  # noqa: E402
from shipyard_models.tokenformer.model import Pattention  # noqa: E402

OPTIONS = {"init": str, "noise": float, "factor": int, "lr": float, "warm": int, "seed": int,
           "vscale": float, "vramp": int, "kvmul": float, "factor2": int, "mid": int, "restart": int,
           "rel": int, "sched": str, "n2": int, "peak": float}
EVALS = (15, 60, 150, 300, 450, 600, 750, 900)  # grown steps at which to evaluate (and the last one)


def add_relative_noise(name: str, mod: Pattention, old: torch.Tensor, old_scale: float, args: GrowArgs) -> None:
    """`rel=1`: add to split copies grown without noise the zero-sum noise growth.grown_parameter
    draws (same generator and order, so a probe is reproducible), its std `args.split_noise` times
    the layer's old value RMS (value_scale applied) instead of absolute."""
    n = old.shape[0]
    k = copies(n, mod.n_tokens - n, args)
    noise = torch.randn(n, k, old.shape[1], generator=_generator(args, name + "/split"),
                        dtype=torch.float64) * args.split_noise
    noise = noise * (old.double() * old_scale).pow(2).mean().sqrt().item()
    noise = (noise - noise.mean(dim=1, keepdim=True)).to(dtype=old.dtype)
    copied = mod.value_tokens[: n * k].view(n, k, -1)
    copied.add_(noise / float(mod.value_scale))


def main() -> None:
    if len(sys.argv) < 2 or "=" in sys.argv[1]:
        sys.exit(__doc__)
    name, opts = sys.argv[1], {"init": "split", "noise": 0.1, "factor": 16, "lr": 1.0, "warm": None, "seed": 0,
                        "vscale": 1.0, "vramp": 0, "kvmul": 1.0, "factor2": 1, "mid": 0, "restart": 0, "rel": 0,
                        "sched": "stages", "n2": None, "peak": bench.FULL["lr"]}
    for arg in sys.argv[2:]:
        key, _, value = arg.partition("=")
        if key not in OPTIONS:
            sys.exit(f"unknown option {key!r}; choose from {', '.join(OPTIONS)}")
        opts[key] = OPTIONS[key](value)
    if opts["sched"] not in ("stages", "global", "wsd"):
        sys.exit(f"sched must be stages, global or wsd, got {opts['sched']!r}")
    mode = {**bench.FULL, "schedule": opts["sched"], "lr": opts["peak"]}
    mode["n2"] = opts["n2"] or mode["n2"]
    seed, n1, n2 = opts["seed"], mode["n1"], mode["n2"]
    torch.set_num_threads(1)
    train_set, val = bench.load_data(mode, Path(tempfile.mkdtemp()))
    batch = bench.batches(seed, mode, train_set)  # the benchmark's batches, in its order
    small, _ = bench.configs(mode)
    suffix = {"stages": "", "global": f"-global{n2}", "wsd": "-wsd"}[opts["sched"]]  # S differs by schedule
    suffix += "" if opts["peak"] == bench.FULL["lr"] else f"-peak{opts['peak']:g}"  # and by peak
    cache = Path(tempfile.gettempdir()) / f"shipyard-tokenformer-S-seed{seed}-{n1}{suffix}.pt"
    torch.manual_seed(seed)
    run = bench.Run(FAMILY.build(small))
    if cache.exists():
        state = torch.load(cache, weights_only=True)
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["opt"])
    else:
        t0 = time.perf_counter()
        for step in range(n1):
            run.step(batch(step), step, mode, opts["sched"])
        torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict()}, cache)
        print(f"S trained in {time.perf_counter() - t0:.0f} s (cached at {cache})", flush=True)
    curve = [(n1, round(run.evaluate(n1, val), 4))]
    m = opts["factor"] - 1
    args = GrowArgs(qkv_tokens=small.qkv_tokens * m, ffn_tokens=small.ffn_tokens * m, seed=seed, init=opts["init"],
                    split_noise=opts["noise"])
    if opts["rel"]:  # growth's own split noise, drawn alike but times each layer's old value RMS
        layers = {path: (mod.value_tokens.detach().clone(), float(mod.value_scale))
                  for path, mod in run.model.named_modules() if isinstance(mod, Pattention)}
    grow(run.model, **{**dataclasses.asdict(args), "split_noise": 0.0 if opts["rel"] else args.split_noise},
         optimizer=run.opt)
    if opts["rel"]:
        with torch.no_grad():
            for path, mod in run.model.named_modules():
                if isinstance(mod, Pattention):
                    add_relative_noise(f"{path}.value_tokens", mod, *layers[path], args)
    for pname, p in run.model.named_parameters():  # a larger second moment: smaller first key steps
        if pname.endswith("key_tokens") and opts["kvmul"] != 1.0:
            run.opt.state[p]["exp_avg_sq"] *= opts["kvmul"]
    values = [p for n, p in run.model.named_parameters() if n.endswith("value_tokens")]
    if opts["vscale"] != 1.0:
        ids = {id(p) for p in values}
        group = run.opt.param_groups[0]
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        run.opt.add_param_group({"params": values, "lr_scale": opts["vscale"]})
    grown_mode = {**mode, "lr": mode["lr"] * opts["lr"], "warmup": opts["warm"] or mode["warmup"],
                  "warmup_grown": opts["warm"] or 0}
    t0 = time.perf_counter()
    for step in range(n1, n1 + n2):
        if opts["factor2"] > 1 and step == n1 + opts["mid"]:
            m2 = opts["factor2"] - 1
            cfg = run.model.cfg
            grow(run.model, qkv_tokens=cfg.qkv_tokens * m2, ffn_tokens=cfg.ffn_tokens * m2, seed=seed + 100,
                 init=opts["init"], split_noise=opts["noise"], optimizer=run.opt)
        if opts["vscale"] != 1.0 and opts["vramp"]:
            t = min(1.0, (step - n1) / opts["vramp"])
            run.opt.param_groups[1]["lr_scale"] = opts["vscale"] + t * (1.0 - opts["vscale"])
        if opts["restart"] and opts["factor2"] > 1 and step >= n1 + opts["mid"]:  # the last stage's own schedule
            run.step(batch(step), step, {**grown_mode, "n1": n1 + opts["mid"], "n2": n2 - opts["mid"]}, "stages")
        elif opts["restart"] and opts["factor2"] > 1:  # the middle stage's own schedule
            run.step(batch(step), step, {**grown_mode, "n2": opts["mid"]}, "stages")
        else:
            run.step(batch(step), step, grown_mode, opts["sched"])
        if step + 1 - n1 in EVALS or step + 1 == n1 + n2:
            curve.append((step + 1, round(run.evaluate(step + 1, val), 4)))
            print(f"{name} step {step + 1}: {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = bench.ROOT / "benchmarks" / "results" / "tokenformer_growth_probes.jsonl"
    with out.open("a") as f:
        f.write(json.dumps({"name": name, **opts, "curve": curve}) + "\n")


if __name__ == "__main__":
    main()
