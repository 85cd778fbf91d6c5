"""minGRU / minLSTM training-step speed: parallel scan vs sequential loop vs cuDNN-style RNNs.

Claim (Feng et al. 2024, "Were RNNs All We Needed?"): the minimal RNNs train with a parallel
scan, much faster than their own sequential recurrence and than GRU / LSTM, at some memory cost
(the paper: ~88% more than GRU). This script measures, per training step (forward + backward of
`out.sum()`, batch 8, width 128, input requiring grad as inside a stack):

* our minGRU / minLSTM layer (shipyard_models.minrnn.MinRNN, default chunked scan),
* the same layers running the paper's log-space scan (`scan="log"`) and a plain loop
  (`scan="sequential"`),
* torch.nn.GRU / torch.nn.LSTM of the same width,
* minGRU-pytorch's `minGRU` (pip install minGRU-pytorch; expansion_factor=1, so the shapes and
  the projection match ours exactly),

at T = 128, 512, 2048, 4096 (--quick: 128, 512, 2048 and fewer repeats). Contenders are timed
round-robin (one step each per round, after warm-up rounds) and each figure is the median
over rounds, so load from other processes hits all of them alike.

Memory, at T = 512: (1) the peak of torch's CPU allocations during one step above the level
at its start, from the profiler's memory timeline; (2) the bytes of the tensors autograd saves
for backward (each storage counted once). Both count only torch tensors, not allocator caching.

Usage: python benchmarks/minrnn_scan.py [--quick]  ->  benchmarks/results/minrnn_scan.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    from shipyard_models.minrnn.model import MinRNN
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "models"))
    from shipyard_models.minrnn.model import MinRNN

BATCH, DIM = 8, 128


class TorchRNN(nn.Module):
    """nn.GRU / nn.LSTM returning only the output sequence."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class Ours(nn.Module):
    def __init__(self, cell: str, scan: str):
        super().__init__()
        self.layer = MinRNN(DIM, cell, 1.0, scan=scan)

    def forward(self, x):
        return self.layer(x)[0]


def contenders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {
        "mingru": Ours("mingru", "chunked"),
        "mingru_log": Ours("mingru", "log"),
        "mingru_loop": Ours("mingru", "sequential"),
        "minlstm": Ours("minlstm", "chunked"),
        "minlstm_loop": Ours("minlstm", "sequential"),
        "gru": TorchRNN(nn.GRU(DIM, DIM, batch_first=True)),
        "lstm": TorchRNN(nn.LSTM(DIM, DIM, batch_first=True)),
    }
    try:
        from minGRU_pytorch import minGRU
        models["reference"] = minGRU(DIM, expansion_factor=1.0)
    except ImportError:
        print("minGRU-pytorch is not installed (pip install minGRU-pytorch --no-deps); "
              "skipping the reference", file=sys.stderr)
    return models


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def time_steps(models: dict[str, nn.Module], T: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step of each model, timed round-robin."""
    x = torch.randn(BATCH, T, DIM, requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(warmup + repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            model = models[name]
            model.zero_grad(set_to_none=True)
            x.grad = None
            start = time.perf_counter()
            train_step(model, x)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_step_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak torch CPU allocation during one step above its starting level (profiler timeline)."""
    from torch.profiler import ProfilerActivity, profile

    train_step(model, x)
    model.zero_grad(set_to_none=True)
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        train_step(model, x)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.load(open(path))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def saved_for_backward_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps between forward and backward."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="T <= 2048 and fewer repeats (< 5 min)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "minrnn_scan.json")
    args = parser.parse_args()
    lengths = [128, 512, 2048] if args.quick else [128, 512, 2048, 4096]
    warmup, repeats = (1, 5) if args.quick else (2, 15)

    models = contenders()
    figures: dict[str, float | bool | int] = {"quick": args.quick, "cores": os.cpu_count(),
                                              "torch_threads": torch.get_num_threads()}
    ms: dict[int, dict[str, float]] = {}
    for T in lengths:
        t0 = time.perf_counter()
        ms[T] = {k: 1e3 * v for k, v in time_steps(models, T, warmup, repeats).items()}
        print(f"T={T}: timed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for name, value in ms[T].items():
            figures[f"ms_per_step_{name}_T{T}"] = round(value, 3)
        ratios = {
            "speedup_vs_gru": ("gru", "mingru"),
            "speedup_vs_lstm": ("lstm", "minlstm"),
            "speedup_vs_loop": ("mingru_loop", "mingru"),
            "speedup_minlstm_vs_loop": ("minlstm_loop", "minlstm"),
            "speedup_vs_log_scan": ("mingru_log", "mingru"),
            "speedup_vs_reference": ("reference", "mingru"),
            "reference_speedup_vs_gru": ("gru", "reference"),
        }
        for figure, (slow, fast) in ratios.items():
            if slow in ms[T] and fast in ms[T]:
                figures[f"{figure}_T{T}"] = round(ms[T][slow] / ms[T][fast], 3)

    T = 512
    x = torch.randn(BATCH, T, DIM, requires_grad=True)
    mem = {name: (peak_step_bytes(m, x), saved_for_backward_bytes(m, x))
           for name, m in models.items() if not name.endswith("_loop")}
    for name, (peak, saved) in mem.items():
        figures[f"mem_peak_MiB_{name}_T{T}"] = round(peak / 2**20, 2)
        figures[f"mem_saved_MiB_{name}_T{T}"] = round(saved / 2**20, 2)
    figures[f"mem_ratio_vs_gru_T{T}"] = round(mem["mingru"][0] / mem["gru"][0], 3)
    figures[f"mem_saved_ratio_vs_gru_T{T}"] = round(mem["mingru"][1] / mem["gru"][1], 3)
    figures[f"mem_ratio_minlstm_vs_lstm_T{T}"] = round(mem["minlstm"][0] / mem["lstm"][0], 3)
    if "reference" in mem:
        figures[f"mem_ratio_reference_vs_gru_T{T}"] = round(mem["reference"][0] / mem["gru"][0], 3)

    names = list(models)
    print(f"\nms per training step (batch {BATCH}, width {DIM}, {os.cpu_count()} cores, median)")
    print(f"{'T':>6} " + " ".join(f"{n:>13}" for n in names))
    for T in lengths:
        print(f"{T:>6} " + " ".join(f"{ms[T][n]:>13.2f}" for n in names))
    print(f"\n{'T':>6} {'vs GRU':>8} {'vs LSTM':>8} {'vs loop':>8} {'vs log':>8} {'vs ref':>8}")
    for T in lengths:
        cols = ["speedup_vs_gru", "speedup_vs_lstm", "speedup_vs_loop", "speedup_vs_log_scan",
                "speedup_vs_reference"]
        row = [figures.get(f"{c}_T{T}", float("nan")) for c in cols]
        print(f"{T:>6} " + " ".join(f"{v:>8.2f}" for v in row))
    print(f"\nmemory per step at T=512, MiB (peak allocated / saved for backward)")
    for name, (peak, saved) in mem.items():
        print(f"{name:>13} {peak / 2**20:8.2f} {saved / 2**20:8.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
