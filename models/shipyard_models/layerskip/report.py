"""What `make demo` prints about a trained LayerSkip model: the per-layer exit table and a short
self-speculative vs autoregressive comparison on held-out code prompts (greedy, batch 1)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import recipe
from .speculative import generate, self_speculative_generate

PROMPTS = 3
PROMPT_LEN = 64
NEW_TOKENS = 48


def report(model: nn.Module, cfg, data_cfg, cache_dir: Path) -> str:
    from . import datasets
    _, val = datasets(cfg, data_cfg, cache_dir)
    model.eval()
    lines = ["per-layer exits on held-out code (loss in nats; agreement = top-1 equal to the last layer)",
             f"  {'exit after layer':>16}  {'loss':>7}  {'agreement':>9}"]
    batch = {"tokens": torch.stack([val[i]["tokens"] for i in range(min(8, len(val)))])}
    with torch.no_grad():
        metrics = recipe.evaluate(model, batch)
    for l in range(cfg.n_layers):
        lines.append(f"  {l:>16}  {float(metrics[f'exit_loss/l{l}']):7.3f}  {float(metrics[f'agree/l{l}']):9.3f}")

    exit_layer = max(1, cfg.n_layers // 3)
    draft = 4
    lines += ["", f"greedy decoding of {PROMPTS} held-out prompts, {NEW_TOKENS} new bytes each "
                  f"(self-speculative: draft {draft} with the first {exit_layer} layers)",
              f"  {'prompt':>6}  {'autoregressive tok/s':>20}  {'self-speculative tok/s':>22}  "
              f"{'acceptance':>10}  {'identical':>9}"]
    step = max(1, len(val) // PROMPTS)
    with torch.no_grad():
        for p in range(PROMPTS):
            prompt = val[p * step]["tokens"][:PROMPT_LEN].unsqueeze(0)
            plain, s_plain = generate(model, prompt, NEW_TOKENS)
            spec, s_spec = self_speculative_generate(model, prompt, NEW_TOKENS, exit_layer=exit_layer,
                                                     draft_len=draft)
            same = torch.equal(plain[0, :spec.shape[1]], spec[0]) and plain.shape == spec.shape
            lines.append(f"  {p:>6}  {s_plain.tokens_per_s:20.1f}  {s_spec.tokens_per_s:22.1f}  "
                         f"{s_spec.acceptance_rate:10.2f}  {str(same):>9}")
    return "\n".join(lines)
