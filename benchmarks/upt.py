"""UPT against an FNO on the same generated flows, and the cost of a rollout step as the inputs grow.

Claims (Alkin et al. 2024, "Universal Physics Transformers"): the latent is of fixed size, so a
latent rollout step costs the same time and memory however many input points were encoded; only
the encoder (once) and the decoder (per query) see the points. And the model rolls transient
flows out, competitively with a grid neural operator.

Measured here, in one run:
1. Cost vs input points (untrained model of the job's size, batch 1, one thread): the median
   time of a latent rollout step (approximator only), of a physical rollout step (encode N
   points + step + decode at the same N points), and of the encoder alone, at N and 16N input
   points (N = 1024; full run also 4N). Contenders are timed round-robin after warm-up so load
   from other processes hits them alike. Peak memory of one step: the largest running sum of
   the CPU allocations and frees that torch's profiler records during the step
   (`profile_memory=True`; tensors alive before the step, such as the latent and the
   weights, are not counted). Figures: `step_time_ratio_16x_points` (latent step at 16N over
   N: the claim is ~1), `physical_step_time_ratio_16x_points` (grows with N),
   `step_peak_memory_ratio_16x_points` (latent step) and
   `physical_step_peak_memory_ratio_16x_points`.
2. Error, UPT vs FNO (`neuralop.models.FNO`, neuraloperator 2.0) on the same generated
   Navier-Stokes trajectories, the same number of optimiser steps, batch size and
   learning-rate schedule. The data are the training-sanity test's (tests/models/upt/
   test_upt_training.py): band-limited vorticity (|m| <= 1) with Kolmogorov forcing, 128
   training trajectories, snapshots 5 time units apart, so one step changes the field by ~0.75
   of its norm (persistence's rel. L2; the zero predictor's is 1). Each contender gets its
   natural input: the FNO the 32x32 grid of u_t (plus the standardised parameters and t/T as
   constant channels), the UPT u_t at N = 128 random points (exact values of the field), both
   conditioned alike; both are trained on one-step MSE only. On the held-out trajectories:
   `one_step_error_vs_persistence` (UPT's one-step rel. L2 at random query points over
   persistence's, which uses the exact u_t there; < 1 beats it),
   `fno_one_step_error_vs_persistence` (the same on the grid), and a rollout from u_0 over all
   snapshots (UPT: encode once, latent steps, decoded on the grid; FNO: autoregressive on the
   grid): `rollout_error_ratio_vs_fno` = mean rel. L2 of UPT's rollout over FNO's (< 1: UPT is
   better), with `rollout_error_ratio_vs_persistence` for each, and each contender's own mean
   rollout rel. L2 (`rollout_rel_l2_mean`, `fno_rollout_rel_l2_mean`), since a rollout that
   drifts towards zero scores below one that keeps its amplitude but loses its phase.

Usage: python benchmarks/upt.py [--quick]  ->  benchmarks/results/upt.json
(needs `neuraloperator`; see the Makefile's `bench` target for how it is installed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
try:
    from shipyard_models.upt import FAMILY, Config, DataConfig, load_flows, relative_l2
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "models"))
    from shipyard_models.upt import FAMILY, Config, DataConfig, load_flows, relative_l2
from shipyard_models.data.flows import evaluate_at, grid_points

# The training-sanity test's data and model (see its docstring for why these data).
DATA = DataConfig(every=5.0, snapshots=8, max_mode=1, nu_min=3e-4, nu_max=1e-3, train_trajectories=128,
                  val_trajectories=8, input_points=128, output_points=64, supernodes=48, resamplings=4)
MODEL = Config(dim=32, heads=4, encoder_depth=1, approximator_depth=2, decoder_depth=1, latent_tokens=16,
               radius=0.12, max_neighbours=32, pos_freqs=2, inverse_encoding_weight=3.0)
BATCH, LR = 8, 3e-3


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def peak_bytes(fn) -> int:
    """Largest running total of torch's CPU allocations minus frees while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:  # self_* excludes the children, so every allocation is counted once
        total += e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        peak = max(peak, total)
    return peak


def cost_vs_points(sizes: list[int], rounds: int) -> dict[str, dict[int, float]]:
    torch.manual_seed(0)
    cfg = Config(dim=64, heads=8, encoder_depth=1, approximator_depth=3, decoder_depth=1, latent_tokens=32,
                 radius=0.12, max_neighbours=32)
    model = FAMILY.build(cfg).eval()
    t, params = torch.zeros(1), torch.zeros(1, 2)
    cases = {}
    for n in sizes:
        pos = torch.rand(1, n, 2)
        values = torch.randn(1, n, 1)
        supernodes = pos[:, :128]
        latent = model.encode(pos, values, supernodes)
        cases[n] = (pos, values, supernodes, latent)

    def latent_step(n):
        model.step(cases[n][3], t, params)

    def physical_step(n):
        pos, values, supernodes, _ = cases[n]
        model.decode(model.step(model.encode(pos, values, supernodes), t, params), pos)

    def encode(n):
        pos, values, supernodes, _ = cases[n]
        model.encode(pos, values, supernodes)

    fns = {"latent_step": latent_step, "physical_step": physical_step, "encode": encode}
    timings = {name: {n: [] for n in sizes} for name in fns}
    with torch.no_grad():
        for r in range(rounds + 2):
            for name, fn in fns.items():
                for n in sizes:
                    reps = 20 if name == "latent_step" else 1  # a latent step is ~1 ms: time 20
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn(n)
                    if r >= 2:  # warm-up rounds
                        timings[name][n].append((time.perf_counter() - start) / reps)
        memory = {f"{name}_peak_bytes": {n: peak_bytes(lambda: fns[name](n)) for n in sizes}
                  for name in ("latent_step", "physical_step")}
    return {**{name: {n: statistics.median(v) for n, v in per.items()} for name, per in timings.items()},
            **memory}


def lr_at(step: int, steps: int) -> float:
    """The test's schedule: 20-step warm-up, then linear decay to 10%."""
    return LR * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)


def train_upt(train, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILY.build(MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        batch = collate([train[i] for i in torch.randint(0, len(train), (BATCH,), generator=gen).tolist()])
        loss, _ = FAMILY.loss(model, batch, step, steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def fno_input(u_BGG: torch.Tensor, params_BP: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """[B, 1 + P + 1, G, G]: the field, then the parameters and t / T as constant channels."""
    g = u_BGG.shape[-1]
    const = torch.cat([params_BP, (t_B / DATA.snapshots)[:, None]], dim=-1)[:, :, None, None]
    return torch.cat([u_BGG[:, None], const.expand(-1, -1, g, g)], dim=1)


def train_fno(fields: torch.Tensor, params: torch.Tensor, steps: int) -> torch.nn.Module:
    """The same transitions u_t -> u_{t+1} (on the grid), steps, batch, schedule and optimiser."""
    try:
        from neuralop.models import FNO
    except ImportError as err:
        raise SystemExit("benchmarks/upt.py needs neuraloperator 2.0 (the FNO baseline): install it as the "
                         "Makefile's `bench` target does") from err

    torch.manual_seed(0)
    model = FNO(n_modes=(8, 8), in_channels=1 + params.shape[1] + 1, out_channels=1, hidden_channels=24,
                n_layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    b, t1 = fields.shape[:2]
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        i = torch.randint(0, b * (t1 - 1), (BATCH,), generator=gen)
        traj, t = i // (t1 - 1), i % (t1 - 1)
        pred = model(fno_input(fields[traj, t], params[traj], t.float()))[:, 0]
        loss = F.mse_loss(pred, fields[traj, t + 1])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def compare(steps: int, cache: Path) -> dict:
    train, val = FAMILY.datasets(MODEL, DATA, cache)
    raw_train, raw_val, norm = load_flows(DATA, cache)
    start = time.perf_counter()
    upt = train_upt(train, steps)
    upt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fno = train_fno(raw_train["fields"] / norm.scale, norm.params(raw_train["params"]), steps)
    fno_seconds = time.perf_counter() - start

    fields = raw_val["fields"] / norm.scale  # [B, T+1, G, G]
    params = norm.params(raw_val["params"])
    b, horizon = fields.shape[0], DATA.snapshots
    truth = fields[:, 1:].flatten(2)
    with torch.no_grad():
        m = FAMILY.evaluate(upt, collate([val[i] for i in range(len(val))]))
        pos = torch.rand(b, DATA.input_points, 2, generator=torch.Generator().manual_seed(1))
        grid = grid_points(DATA.grid, torch.float32)[None].expand(b, -1, -1)
        upt_roll = upt.rollout_latent(pos, evaluate_at(fields[:, 0], pos)[..., None], pos[:, :DATA.supernodes],
                                      torch.zeros(b), params, horizon, grid)[..., 0]
        u, fno_roll = fields[:, 0], []
        for k in range(horizon):
            u = fno(fno_input(u, params, torch.full((b,), float(k))))[:, 0]
            fno_roll.append(u.flatten(1))
        fno_roll = torch.stack(fno_roll, dim=1)
        t = torch.arange(horizon).repeat(b)  # FNO one step from the true u_t, every t
        fno_next = fno(fno_input(fields[:, :-1].flatten(0, 1), params.repeat_interleave(horizon, 0),
                                 t.float()))[:, 0].unflatten(0, (b, horizon)).flatten(2)
    per_step = lambda roll: [relative_l2(roll[:, k], truth[:, k]).item() for k in range(horizon)]
    persistence = [relative_l2(fields[:, 0].flatten(1), truth[:, k]).item() for k in range(horizon)]
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    return {"upt_one_step": m["rel_l2"].item(), "upt_persistence": m["persistence_rel_l2"].item(),
            "fno_one_step": relative_l2(fno_next.flatten(0, 1), truth.flatten(0, 1)).item(),
            "fno_persistence": relative_l2(fields[:, :-1].flatten(0, 1).flatten(1), truth.flatten(0, 1)).item(),
            "upt_rollout": per_step(upt_roll), "fno_rollout": per_step(fno_roll),
            "persistence_rollout": persistence,
            "upt_params": count(upt), "fno_params": count(fno), "upt_train_s": upt_seconds,
            "fno_train_s": fno_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, rounds and training steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [1024, 16384] if args.quick else [1024, 4096, 16384]
    cost = cost_vs_points(sizes, rounds=9 if args.quick else 21)
    steps = 900 if args.quick else 2000
    with tempfile.TemporaryDirectory() as cache:
        err = compare(steps, Path(cache))

    print(f"{'input points':>12} {'latent step ms':>15} {'physical step ms':>17} {'encode ms':>10} "
          f"{'latent step MiB':>16} {'physical step MiB':>18}")
    for n in sizes:
        print(f"{n:>12} {1e3 * cost['latent_step'][n]:>15.2f} {1e3 * cost['physical_step'][n]:>17.2f} "
              f"{1e3 * cost['encode'][n]:>10.2f} {cost['latent_step_peak_bytes'][n] / 2**20:>16.2f} "
              f"{cost['physical_step_peak_bytes'][n] / 2**20:>18.2f}")
    print(f"one step rel. L2: UPT {err['upt_one_step']:.3f} (persistence {err['upt_persistence']:.3f}), "
          f"FNO {err['fno_one_step']:.3f} (persistence {err['fno_persistence']:.3f}); "
          f"{steps} steps: UPT {err['upt_train_s']:.0f} s ({err['upt_params']} parameters), "
          f"FNO {err['fno_train_s']:.0f} s ({err['fno_params']} parameters)")
    print("rollout rel. L2 (UPT / FNO / persistence) per step:",
          " ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in
                   zip(err["upt_rollout"], err["fno_rollout"], err["persistence_rollout"])))
    lo, hi = sizes[0], sizes[-1]
    mean = statistics.mean
    figures = {
        "rollout_error_ratio_vs_fno": mean(err["upt_rollout"]) / mean(err["fno_rollout"]),
        "step_time_ratio_16x_points": cost["latent_step"][hi] / cost["latent_step"][lo],
        "one_step_error_vs_persistence": err["upt_one_step"] / err["upt_persistence"],
        "fno_one_step_error_vs_persistence": err["fno_one_step"] / err["fno_persistence"],
        "physical_step_time_ratio_16x_points": cost["physical_step"][hi] / cost["physical_step"][lo],
        "step_peak_memory_ratio_16x_points":
            cost["latent_step_peak_bytes"][hi] / cost["latent_step_peak_bytes"][lo],
        "physical_step_peak_memory_ratio_16x_points":
            cost["physical_step_peak_bytes"][hi] / cost["physical_step_peak_bytes"][lo],
        "step_peak_mib_16x_points": cost["latent_step_peak_bytes"][hi] / 2**20,
        "physical_step_peak_mib_16x_points": cost["physical_step_peak_bytes"][hi] / 2**20,
        "rollout_error_ratio_vs_persistence": mean(err["upt_rollout"]) / mean(err["persistence_rollout"]),
        "fno_rollout_error_ratio_vs_persistence": mean(err["fno_rollout"]) / mean(err["persistence_rollout"]),
        # the zero predictor's rel. L2 is 1: each contender's own mean rollout error, for scale
        "rollout_rel_l2_mean": mean(err["upt_rollout"]),
        "fno_rollout_rel_l2_mean": mean(err["fno_rollout"]),
        "upt_parameters": err["upt_params"],
        "fno_parameters": err["fno_params"],
        "train_steps": steps,
        "quick": args.quick,
        "cores": os.cpu_count(),
    }
    out = ROOT / "benchmarks" / "results" / "upt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
