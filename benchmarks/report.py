"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json (tables are never typed in).

    python benchmarks/report.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

NOTES = {
    "minrnn_scan": "minGRU/minLSTM training step (forward+backward): parallel scan vs sequential loop, "
                   "torch.nn.GRU/LSTM and the minGRU-pytorch re-implementation (`python benchmarks/minrnn_scan.py`).",
    "layerskip_speedup": "Greedy batch-1 decoding: self-speculative vs autoregressive and Hugging Face's "
                         "assistant_early_exit on the same weights, LayerSkip-trained model and a plainly trained "
                         "twin as control (`python benchmarks/layerskip_speedup.py`).",
    "platform_overhead": "Throughput through `shipyard run`'s loop vs a bare PyTorch loop, and 2 workers vs 1 "
                         "(`python benchmarks/platform_overhead.py`).",
    "serve": "LayerSkip completions through `shipyard serve` (Ray Serve on 127.0.0.1): requests/s and latency, "
             "self-speculative vs plain decoding at 1, 4 and 16 clients; minRNN with its decoding steps batched "
             "across requests vs not (`python benchmarks/serve.py`).",
    "laplace_ood": "Last-layer Laplace on the same classifier: identity curvature (ICLA) vs diag/KFAC/full GGN "
                   "(ours) vs laplace-torch's last-layer KFAC and diag; near/far OOD AUROC, ECE, NLL, fit time "
                   "over seeds (`python benchmarks/laplace_ood.py`).",
    "allegro_scaling": "Allegro energy+forces throughput vs system size (CPU seconds, 1 thread, neighbour list "
                       "included) against the reference nequip-allegro 0.8.3 on the same structures and "
                       "hyperparameters (run from its own `.venv-ref`), ghost/owned ratios, 1 vs 2 Ray actors "
                       "(`python benchmarks/allegro_scaling.py`).",
    "allegro_partitioner": "The spatial partitioner alone at 10^7 atoms: time, ghosts and message volume per "
                           "step against the number of domains (`python benchmarks/allegro_scaling.py "
                           "--partitioner-only`).",
    "tokenformer_growth": "TokenFormer progressive growth, the paper's protocol: S small for `steps_small` "
                          "steps, G = S grown x`factor` by `growth_init` growth (split: every parameter token "
                          "into `factor` copies, values under value_scale 1 / `factor`) and trained "
                          "`steps_grown` more, B1 big from scratch for `b1_steps` (S's steps, as every "
                          "from-scratch model of the paper sees the same 300B tokens), B2 small continued. "
                          "Pattention is `pattention_flops_share` of the big model's FLOPs, a small step costs "
                          "`flops_ratio_small_over_big` of a big one, and G's whole run "
                          "`flops_fraction_G_total` of B1's: reaching B1's final loss at all meets the <= 0.5 "
                          "goal. `val_B1_at_G_flops` is where B1 stood at G's total cost. One-seed probes of the "
                          "grown stage: benchmarks/results/tokenformer_growth_probes.jsonl, README "
                          "(`python benchmarks/tokenformer_growth.py --inits split`).",
    "tokenformer_growth_b1_total": "The same size with B1 trained for G's total steps (`steps_small` + "
                                   "`steps_grown`), 900 grown steps, split growth before value_scale (noise "
                                   "0.15) and zero-key growth (G_zero), run at commit c25578f (today: `python "
                                   "benchmarks/tokenformer_growth.py --b1-steps total --n2 900 --inits "
                                   "split,zero`, with value_scale and noise 0.1).",
    "tokenformer_growth_n6000_seed2": "The same benchmark with both budgets doubled (S and B1 6000 steps, "
                                      "G's grown stage 2280, still 0.498 of B1), seed 2 only (the farthest "
                                      "at 3000): does a longer-trained, flatter B1 let G catch up? "
                                      "(`python benchmarks/tokenformer_growth.py --inits split --seed 2 "
                                      "--n1 6000 --n2 2280`).",
    "tokenformer_growth_wsd": "The same benchmark with a warmup-stable-decay schedule for every run: S at the "
                              "peak learning rate until growth (nothing to re-warm), G and B2 decaying over "
                              "their grown steps, B1 at the peak until its last `steps_grown` steps and then "
                              "decaying alike -- is the cosine B1 the fair target? (`python "
                              "benchmarks/tokenformer_growth.py --inits split --schedule wsd`).",
    "tokenformer_growth_x8": "The previous size of the same benchmark (width 64, 8 / 32 tokens grown x8, "
                             "zero-key growth only; the script has since gained split growth): `python "
                             "benchmarks/tokenformer_growth.py --dim 64 --qkv-tokens 8 --ffn-tokens 32 "
                             "--factor 8 --inits zero`.",
    "matformer": "Matformer vs a torch-geometric baseline on generated crystals: MAE, throughput, graph "
                 "construction time (`python benchmarks/matformer.py`).",
    "upt": "Universal Physics Transformer vs an FNO (neuraloperator 2.0) on the same generated Navier-Stokes "
           "trajectories, steps, batch and schedule: UPT sees u_t at 128 random points, the FNO the exact 32x32 "
           "grid. `rollout_error_ratio_vs_fno` < 1 means UPT's latent rollout has the lower mean rel. L2, but "
           "read it with `rollout_rel_l2_mean` and `fno_rollout_rel_l2_mean` (the zero predictor scores 1): at "
           "this budget neither rollout is useful past a few steps, and the FNO wins one step "
           "(`fno_one_step_error_vs_persistence`). Step time and peak memory (torch profiler's CPU allocations) "
           "of one latent and one physical rollout step at N and 16N input points (`python benchmarks/upt.py`).",
}


HEADLINES = {
    "minrnn_scan": ["speedup_vs_gru_T512", "speedup_vs_lstm_T512", "speedup_vs_loop_T2048",
                    "speedup_vs_reference_T512", "mem_ratio_vs_gru_T512"],
    "platform_overhead": ["overhead_ratio", "scaling_efficiency_2w"],
    "layerskip_speedup": ["speedup_vs_autoregressive", "speedup_vs_hf_early_exit", "greedy_identical",
                          "acceptance_rate", "control_speedup_vs_autoregressive"],
    "serve": ["rps_ratio_self_speculative_vs_plain", "p99_ms_16_clients", "errors_5xx",
              "rps_ratio_minrnn_batched_vs_unbatched_c16"],
    "laplace_ood": ["auroc_near_icla", "auroc_near_best_curvature", "fit_time_ratio_kfac_over_icla", "ece_icla",
                    "auroc_near_laplace_torch_kfac", "fit_time_ratio_laplace_torch_kfac_over_kfac"],
    "allegro_scaling": ["throughput_ratio_vs_reference", "throughput_ratio_vs_reference_min",
                        "time_per_atom_ratio_largest_vs_smallest", "partition_max_force_error",
                        "weak_scaling_efficiency_2_actors"],
    "tokenformer_growth": ["reached_target", "flops_fraction_of_scratch", "flops_fraction_stage_only",
                           "final_val_G", "final_val_B1", "val_B1_at_G_flops", "growth_max_logit_change"],
    "tokenformer_growth_b1_total": ["reached_target", "final_val_G", "final_val_B1", "reached_target_zero",
                                    "final_val_G_zero"],
    "tokenformer_growth_n6000_seed2": ["reached_target", "final_val_G", "final_val_B1", "val_B1_at_G_flops"],
    "tokenformer_growth_wsd": ["reached_target", "final_val_G", "final_val_B1", "val_B1_at_G_flops"],
    "tokenformer_growth_x8": ["reached_target", "final_val_G", "final_val_B1"],
    "matformer": ["mae_ratio_vs_baseline", "mae_over_target_std", "graph_build_ms_per_structure"],
    "upt": ["rollout_error_ratio_vs_fno", "step_time_ratio_16x_points", "one_step_error_vs_persistence",
            "fno_one_step_error_vs_persistence", "step_peak_memory_ratio_16x_points"],
}


def fmt(value) -> str:
    """Floats to 4 significant digits (the JSON keeps full precision); everything else as is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(figures: dict) -> str:
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| `{k}` | {fmt(v)} |" for k, v in figures.items()]
    return "\n".join(rows)


def main() -> None:
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; every figure is a "
             "ratio or count measured against its baseline in the same run (see each script's docstring).", ""]
    for path in sorted((HERE / "results").glob("*.json")):
        figures = json.loads(path.read_text())
        mode = "quick" if figures.get("quick") else "full"
        head = {k: figures[k] for k in HEADLINES.get(path.stem, []) if k in figures}
        parts += [f"## {path.stem} ({mode} run, {figures.get('cores')} cores)", "", NOTES.get(path.stem, ""), ""]
        if head:
            parts += ["Headline figures:", "", table(head), ""]
        parts += ["<details><summary>all figures</summary>", "", table(figures), "", "</details>", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print((HERE / "RESULTS.md").read_text())
    update_readme(headline_rows())


def headline_rows() -> str:
    rows = ["| benchmark | figure | value | run |", "|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        figures = json.loads(path.read_text())
        mode = "quick" if figures.get("quick") else "full"
        for k in HEADLINES.get(path.stem, []):
            if k in figures:
                rows.append(f"| {path.stem} | `{k}` | {fmt(figures[k])} | {mode}, {figures.get('cores')} cores |")
    return "\n".join(rows)


def update_readme(block: str) -> None:
    """Replace the README's generated headline table (between the bench markers)."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    begin, end = "<!-- bench:begin (generated by benchmarks/report.py) -->", "<!-- bench:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


if __name__ == "__main__":
    main()
