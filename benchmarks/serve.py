"""Serving LayerSkip over HTTP (Ray Serve): requests/s and latency of self-speculative vs plain
greedy decoding at 1, 4 and 16 concurrent clients.

Claim (issue 6): the self-speculative decoding LayerSkip's paper (Elhoushi et al. 2024,
arXiv:2404.16710) reports as faster than autoregressive decoding stays faster behind a real
server, and the server answers every request (zero 5xx) under concurrent load.

1. Model: the LayerSkip-trained byte LM of `benchmarks/layerskip_speedup.py` (dim 128, 12 layers,
   trained 2000 steps on the standard library's source), from its weight cache in
   .shipyard/bench/ (trained there first if absent; --quick trains its 150-step version only when
   the 2000-step weights are not cached). `--checkpoint TARGET` serves any finished checkpoint
   instead (run id, run or checkpoint directory, s3://, registered model).
2. The weights become a real checkpoint through the platform's own writer
   (`shipyard.export.save_model`: a DDP engine in a one-process gloo group), served exactly as
   `shipyard serve` serves it: one replica, one logical CPU, one torch thread, on 127.0.0.1.
3. Requests: greedy completions (`temperature: 0`) of 64-byte code prompts from the held-out
   split, `max_tokens` 64 (--quick 32); self-speculative with the exit layer and draft length
   `layerskip_speedup.py` found best (from its results JSON; else E = 3, d = 3) vs
   `speculative: false`. Per concurrency level both modes run in alternating rounds (so load
   from other processes hits both alike), each client a thread with its own HTTP session.
   Latency = wall time of one request from send to the whole body received.

4. Request batching: a minRNN of the same width (randomly initialised; decoding cost does not
   depend on the weights) served twice from one checkpoint, its decoding steps batched across
   concurrent requests (`max_batch` 16, the default: `shipyard.serve.lm.StepBatcher`) and not
   (`max_batch` 1), the same greedy requests at 1, 4, 16 clients in alternating rounds.

Figures (benchmarks/results/serve.json):
  rps_ratio_self_speculative_vs_plain   requests/s self-speculative / plain, 1 client (the
                                        latency-bound regime the paper's claim is about)
  rps_ratio_c{1,4,16}                   the same ratio at each concurrency
  p99_ms_16_clients                     p99 latency (ms) at 16 clients, self-speculative (the default)
  errors_5xx                            responses >= 500 over the whole run (must be 0)
  rps_ratio_minrnn_batched_vs_unbatched_c16   minRNN requests/s with step batching / without,
                                        16 clients (rps_ratio_minrnn_batched_c{1,4,16} per level)
  rps_*, p50_ms_*, p99_ms_*             per mode and concurrency; acceptance_rate (server-reported)

Usage: python benchmarks/serve.py [--quick] [--checkpoint TARGET]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import layerskip_speedup as ls  # noqa: E402  (its model, data, prompts and weight cache)

CLIENTS = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_weights(quick: bool):
    """(model, spec dict, steps): the cached 2000-step weights, else trained now."""
    cfg = ls.Config(**ls.SIZE, **ls.LAYERSKIP)
    train_set, val_set = ls.FAMILY.datasets(cfg, ls.DATA, ls.DATA_DIR)
    mode = ls.QUICK if quick and not ls.cache_path("layerskip", cfg, ls.FULL).exists() else ls.FULL
    model, _, _ = ls.train_or_load("layerskip", cfg, train_set, mode, retrain=False)
    from dataclasses import asdict
    spec = {"name": "serve-bench", "model": {"family": "layerskip", **asdict(cfg)},
            "data": asdict(ls.DATA), "train": {"steps": mode.steps, "batch_size": mode.batch},
            "scaling": {"num_workers": 1}}
    return model, spec, val_set, mode.steps


def write_checkpoint(model, raw_spec: dict, runs: Path) -> Path:
    """The platform's checkpoint writer (a one-worker DDP checkpoint, as `shipyard run` writes)."""
    from shipyard.export import save_model
    from shipyard.train import checkpoint as ckpt
    return save_model(model, raw_spec, runs / raw_spec["name"] / ckpt.dir_name(0),
                      step=raw_spec["train"]["steps"])


def best_speculation() -> tuple[int, int]:
    path = ROOT / "benchmarks" / "results" / "layerskip_speedup.json"
    try:
        found = json.loads(path.read_text())
        return int(found["best_exit_layer"]), int(found["best_draft_len"])
    except (OSError, KeyError, ValueError):
        return 3, 3


def run_cell(url: str, bodies: list[dict], clients: int) -> dict:
    import requests
    sessions: dict[int, requests.Session] = {}

    def one(body):
        session = sessions.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        r = session.post(url + "/v1/completions", json=body, timeout=300)
        elapsed = time.perf_counter() - start
        usage = r.json().get("usage", {}) if r.status_code == 200 else {}
        return r.status_code, elapsed, usage

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    return {"wall": time.perf_counter() - start, "codes": [c for c, _, _ in results],
            "latencies": [t for _, t, _ in results], "usage": [u for _, _, u in results]}


MINRNN = {"vocab_size": 256, "dim": 128, "depth": 4, "expansion": 2.0}
"""The batching contender: a minRNN of LayerSkip's width, randomly initialised (decoding cost does
not depend on the weights: the requests have no stop strings and always run to max_tokens)."""


def minrnn_batching(prompts: list[str], max_tokens: int, per_client_round: int) -> dict:
    """The same minRNN checkpoint served twice, steps batched across requests (max_batch 16, the
    default) and not (max_batch 1); greedy completions at 1, 4 and 16 clients in alternating
    rounds. Returns rps / p99 per setting and the batched/unbatched request-rate ratios."""
    from ray import serve
    from shipyard.registry import MODELS
    from shipyard.serve import app as serving
    from shipyard.spec import parse_job
    raw = {"name": "serve-bench-minrnn", "model": {"family": "minrnn", **MINRNN}, "data": {"seq_len": 64},
           "train": {"steps": 1, "batch_size": 1}, "scaling": {"num_workers": 1}}
    torch.manual_seed(0)
    model = MODELS["minrnn"].build(parse_job(raw).model)
    settings = {"batched": 16, "unbatched": 1}
    cells: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-minrnn-") as tmp:
        checkpoint = str(write_checkpoint(model, raw, Path(tmp)))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([serve.RunTarget(serving.build_app(serving.ServeOptions(
            checkpoint=checkpoint, run_name=f"minrnn-{name}", max_batch=b).to_dict()),
            name=f"minrnn-{name}", route_prefix=f"/{name}") for name, b in settings.items()])
        urls = {name: f"http://127.0.0.1:{port}/{name}" for name in settings}
        try:
            for name in settings:
                run_cell(urls[name], [{"prompt": prompts[0], "max_tokens": 4}], 1)  # warm-up
            for clients in CLIENTS:
                for rnd in range(2):
                    for name in (list(settings) if rnd % 2 == 0 else list(settings)[::-1]):
                        bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                   "temperature": 0} for i in range(clients * per_client_round)]
                        cells.setdefault((name, clients), []).append(run_cell(urls[name], bodies, clients))
            import requests
            largest = requests.get(urls["batched"] + "/v1/models", timeout=30).json()[
                "data"][0]["minrnn"]["batching"]["largest_batch"]
        finally:
            serve.shutdown()
    out: dict = {"minrnn_largest_batch": largest}
    print(f"\nminRNN over Ray Serve (dim {MINRNN['dim']}, depth {MINRNN['depth']}): decoding steps "
          f"batched across requests (max_batch 16) vs not; greedy, {max_tokens} new tokens")
    print(f"{'clients':>8} {'setting':>17} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    bad = 0
    for clients in CLIENTS:
        for name in settings:
            runs = cells[(name, clients)]
            lat = [t for r in runs for t in r["latencies"]]
            bad += sum(c >= 500 for r in runs for c in r["codes"])
            rps = len(lat) / sum(r["wall"] for r in runs)
            out[f"rps_minrnn_{name}_c{clients}"] = round(rps, 2)
            out[f"p99_ms_minrnn_{name}_c{clients}"] = round(1000 * pct(lat, 0.99), 1)
            print(f"{clients:>8} {name:>17} {rps:8.2f} {1000 * statistics.median(lat):8.0f} "
                  f"{1000 * pct(lat, 0.99):8.0f}")
        out[f"rps_ratio_minrnn_batched_c{clients}"] = round(
            out[f"rps_minrnn_batched_c{clients}"] / out[f"rps_minrnn_unbatched_c{clients}"], 3)
    out["minrnn_5xx"] = bad
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    parser.add_argument("--checkpoint", help="serve this target instead of the benchmark's model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    max_tokens, per_client_round = (32, 2) if args.quick else (64, 3)

    from ray import serve
    from shipyard.cluster import connect
    from shipyard.serve import app as serving
    from shipyard.serve.target import resolve

    model, raw_spec, val_set, steps = trained_weights(args.quick)
    prompts = [bytes(p[0].tolist()).decode("utf-8", "replace")
               for p in ls.code_prompts(val_set.data, 8, 64)]
    E, d = best_speculation()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        target = resolve(args.checkpoint) if args.checkpoint else None
        checkpoint = target.checkpoint if target else str(write_checkpoint(model, raw_spec, Path(tmp)))
        connect(num_cpus=4)
        url = serving.start(serving.ServeOptions(checkpoint=checkpoint, run_name="serve-bench"),
                            port=free_port())
        modes = {"self_speculative": {"exit_layer": E, "num_speculations": d},
                 "plain": {"speculative": False}}
        cells: dict[tuple[str, int], list[dict]] = {}
        try:
            for body in ({"prompt": prompts[0], "max_tokens": 4, **m} for m in modes.values()):
                run_cell(url, [body], 1)  # warm-up
            for clients in CLIENTS:
                for rnd in range(2):  # alternating order
                    for name in (list(modes) if rnd % 2 == 0 else list(modes)[::-1]):
                        bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                   "temperature": 0, **modes[name]}
                                  for i in range(clients * per_client_round)]
                        cells.setdefault((name, clients), []).append(run_cell(url, bodies, clients))
        finally:
            serving.stop()
            serve.shutdown()

    figures: dict = {}
    errors = 0
    print(f"\nLayerSkip over Ray Serve: greedy, {max_tokens} new tokens, self-speculative E={E} d={d} "
          f"vs plain; 1 replica, 1 torch thread")
    print(f"{'clients':>8} {'mode':>17} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'5xx':>5}")
    for clients in CLIENTS:
        for name in modes:
            runs = cells[(name, clients)]
            lat = [t for r in runs for t in r["latencies"]]
            codes = [c for r in runs for c in r["codes"]]
            rps = len(lat) / sum(r["wall"] for r in runs)
            bad = sum(c >= 500 for c in codes)
            errors += bad + sum(c != 200 for c in codes if c < 500)
            figures[f"rps_{name}_c{clients}"] = round(rps, 2)
            figures[f"p50_ms_{name}_c{clients}"] = round(1000 * statistics.median(lat), 1)
            figures[f"p99_ms_{name}_c{clients}"] = round(1000 * pct(lat, 0.99), 1)
            print(f"{clients:>8} {name:>17} {rps:8.2f} {1000 * statistics.median(lat):8.0f} "
                  f"{1000 * pct(lat, 0.99):8.0f} {bad:>5}")
        figures[f"rps_ratio_c{clients}"] = round(
            figures[f"rps_self_speculative_c{clients}"] / figures[f"rps_plain_c{clients}"], 3)
    batching = minrnn_batching(prompts, max_tokens, per_client_round)
    minrnn_5xx = batching.pop("minrnn_5xx")
    usage = [u for r in cells[("self_speculative", 1)] for u in r["usage"] if u]
    drafted = sum(u["drafted_tokens"] for u in usage)
    figures = {"rps_ratio_self_speculative_vs_plain": figures["rps_ratio_c1"],
               "p99_ms_16_clients": figures["p99_ms_self_speculative_c16"],
               "errors_5xx": sum(c >= 500 for cs in cells.values() for r in cs for c in r["codes"]) + minrnn_5xx,
               "non_200": errors,
               "acceptance_rate": round(sum(u["accepted_tokens"] for u in usage) / drafted, 3) if drafted else 0.0,
               "rps_ratio_minrnn_batched_vs_unbatched_c16": batching["rps_ratio_minrnn_batched_c16"],
               **figures, **batching, "exit_layer": E, "num_speculations": d, "max_tokens": max_tokens,
               "model_train_steps": steps if not args.checkpoint else None,
               "quick": args.quick, "cores": os.cpu_count()}
    print(f"total {time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
