"""Autoregressive and self-speculative decoding ("LayerSkip: Enabling Early Exit Inference and
Self-Speculative Decoding", Elhoushi et al., 2024, arXiv:2404.16710, Section 4.3).

`generate` decodes token by token with the KV cache, through all layers or, with `exit_layer=E`,
through the first E layers only (early-exit inference). `self_speculative_generate` drafts with
the first E layers and verifies with the remaining ones:

* Invariant at the start of a round: every layer caches positions [0, n - 1) of the n tokens so
  far; the last token is not yet processed.
* Draft: feed the last token, then each new draft, through layers [0, E) + the shared head,
  keeping the residual stream h_E (layer E's input) of every fed position; after k drafts, feed
  the last draft through [0, E) as well (no head). The early layers now cache n + k positions.
* Verify: one forward of layers [E, L) over the k + 1 cached h_E (the last token and the k
  drafts), reusing the late layers' cache; no early layer runs twice. It gives the full model's
  distribution after each of the k + 1 positions.
* Accept: greedy keeps the drafts up to the first one that differs from the full model's argmax,
  then appends the full model's token (the correction, or a bonus token after k accepted
  drafts), so the output equals greedy autoregressive decoding exactly. Sampling uses the
  speculative-sampling rule (Leviathan et al., 2023; Chen et al., 2023): accept draft x with
  probability min(1, p(x) / q(x)), otherwise sample from norm(max(p - q, 0)); after k accepted
  drafts sample the bonus from p. Every emitted token is then distributed exactly as p.
* Crop: all layers keep positions [0, n + a) for a accepted drafts, restoring the invariant.

Stats per generation (`GenerationStats`): acceptance rate, tokens per round, layer-forwards per
token (layer applications to one position, summed, per new token), sequential layer passes per
token (layer calls, each over however many positions, per new token), tokens/s.

Deviations, and why:
* Self-speculative decoding is for batch size 1 (acceptance lengths differ per row); plain
  `generate` takes any batch of equal-length prompts.
* The paper's cache reuse keeps the drafting layers' KV cache and an "exit query cache" so that
  verification continues from layer E; we keep the residual stream entering layer E (h_E) of
  the drafted positions for the same purpose, and a per-layer KV cache for all layers.
* The last draft also runs through layers [0, E) (without the head) before verification, so
  the verification forward covers the k + 1 positions from layer E up.
* Drafting stops early at a stop token or when the draft would exceed max_new_tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .model import KVCache

__all__ = ["GenerationStats", "generate", "self_speculative_generate", "distribution",
           "speculative_accept"]


@dataclass
class GenerationStats:
    """What one generation cost.

    Layer counts cover the positions whose logits chose a new token (for autoregressive decoding
    that includes the prompt's last position, so it costs exactly L layer-forwards per token);
    the rest of the prompt (prefill) is excluded. `new_tokens` counts the tokens of all rows
    (padding after a row's stop token excluded).
    """

    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    layer_forwards: int = 0
    layer_passes: int = 0
    prefill_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def layer_forwards_per_token(self) -> float:
        return self.layer_forwards / self.new_tokens if self.new_tokens else 0.0

    @property
    def layer_passes_per_token(self) -> float:
        return self.layer_passes / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round,
                "layer_forwards_per_token": self.layer_forwards_per_token,
                "layer_passes_per_token": self.layer_passes_per_token,
                "tokens_per_s": self.tokens_per_s}


def distribution(logits_V: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution (float64) of logits [..., V] at a temperature, nucleus-filtered."""
    probs = torch.softmax(logits_V.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _choose(logits_BV: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled tokens [B] on the CPU (sampling runs on the CPU with `generator`)."""
    if temperature <= 0:
        return logits_BV.argmax(-1).cpu()
    probs = distribution(logits_BV, temperature, top_p).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def speculative_accept(p_KV: torch.Tensor, q_KV: torch.Tensor, drafts: Sequence[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative-sampling acceptance of drafts drawn from q.

    Args:
        p_KV: the target distributions after each of the k + 1 positions ([k + 1, V]).
        q_KV: the draft distributions the k drafts were sampled from ([k, V]).
        drafts: the k drafted tokens.
    Returns:
        (number of accepted drafts a, the token to append after them).
    """
    for i, x in enumerate(drafts):
        u = torch.rand((), dtype=torch.float64, generator=generator)
        if u * q_KV[i, x] <= p_KV[i, x]:  # accept with probability min(1, p / q)
            continue
        residual = (p_KV[i] - q_KV[i]).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: nothing to correct
            residual = p_KV[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    k = len(drafts)
    return k, int(torch.multinomial(p_KV[k], 1, generator=generator))


def _check_prompt(model: nn.Module, prompt_BT: torch.Tensor, max_new_tokens: int):
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] == 0:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got {tuple(prompt_BT.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return model.cfg.n_layers


@torch.no_grad()
def generate(model: nn.Module, prompt_BT: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             exit_layer: int | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, GenerationStats]:
    """Autoregressive decoding with the KV cache.

    Args:
        model: a LayerSkipLM (unwrapped), in eval mode.
        prompt_BT: int64 prompts of equal length.
        max_new_tokens: at most this many new tokens per row.
        temperature: 0 = greedy; else sample from softmax(logits / temperature).
        top_p: nucleus sampling mass (1 = off).
        stop_tokens: a row stops after emitting one of these; finished rows are padded with
            their stop token until every row is done.
        exit_layer: decode with layers [0, exit_layer) + head only (early exit); None = all.
        generator: a CPU torch.Generator for sampling (sampling runs on the CPU).
    Returns:
        (tokens [B, T + n], stats) with n <= max_new_tokens.
    """
    L = _check_prompt(model, prompt_BT, max_new_tokens)
    end = L if exit_layer is None else exit_layer
    if not 1 <= end <= L:
        raise ValueError(f"exit_layer must be in [1, {L}], got {exit_layer}")
    stats, stop = GenerationStats(), torch.tensor(list(stop_tokens), dtype=torch.long)
    start = time.perf_counter()
    cache = model.new_cache()
    logits, _ = model(prompt_BT, cache=cache, end_layer=end)
    stats.prefill_seconds = time.perf_counter() - start
    out, done = [prompt_BT], torch.zeros(prompt_BT.shape[0], dtype=torch.bool)
    pad = torch.full_like(done, stop_tokens[0] if len(stop_tokens) else 0, dtype=torch.long)
    for i in range(max_new_tokens):
        token_B = _choose(logits[:, -1], temperature, top_p, generator)
        token_B = torch.where(done, pad, token_B)
        out.append(token_B[:, None].to(prompt_BT.device))
        stats.new_tokens += int((~done).sum())
        stats.rounds += 1
        stats.layer_forwards += end * prompt_BT.shape[0]  # the position whose logits chose it
        stats.layer_passes += end
        done |= torch.isin(token_B, stop)
        if done.all() or i == max_new_tokens - 1:
            break
        logits, _ = model(out[-1], cache=cache, end_layer=end)
    stats.seconds = time.perf_counter() - start
    return torch.cat(out, dim=1), stats


@torch.no_grad()
def self_speculative_generate(
        model: nn.Module, prompt_1T: torch.Tensor, max_new_tokens: int, *, exit_layer: int,
        draft_len: int, temperature: float = 0.0, top_p: float = 1.0,
        stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
        on_round: Callable[[list[int], KVCache], None] | None = None,
        draft_confidence: float = 0.0
) -> tuple[torch.Tensor, GenerationStats]:
    """Self-speculative decoding: draft with layers [0, exit_layer), verify with the rest.

    Args:
        model: a LayerSkipLM (unwrapped), in eval mode.
        prompt_1T: int64 prompt, batch size 1.
        max_new_tokens: at most this many new tokens.
        exit_layer: E, the number of drafting layers (1 <= E < L).
        draft_len: d, drafts per round (fewer near the end or after a stop token).
        temperature, top_p: 0 = greedy (output equals greedy `generate`); else speculative
            sampling, whose tokens follow the full model's (filtered) distribution exactly.
        stop_tokens: stop after emitting one of these.
        generator: a CPU torch.Generator for sampling (sampling runs on the CPU).
        on_round: called after every round with (all tokens so far, the cache); the cache then
            holds every position but the last for every layer.
        draft_confidence: stop drafting early in a round once a draft's probability under the
            early exit (the top one when greedy) falls below this (0 = always draft d), so that
            drafts likely to be rejected cost no early-layer passes. Not in the paper (it drafts
            a fixed d); Hugging Face's `assistant_confidence_threshold` does the same. The output
            is unaffected: every draft is still verified.
    Returns:
        (tokens [1, T + n], stats) with n <= max_new_tokens.
    """
    L = _check_prompt(model, prompt_1T, max_new_tokens)
    E = exit_layer
    if prompt_1T.shape[0] != 1:
        raise ValueError(f"self-speculative decoding takes batch size 1, got {prompt_1T.shape[0]}")
    if not 1 <= E < L:
        raise ValueError(f"exit_layer must be in [1, {L - 1}], got {E}")
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    if not 0.0 <= draft_confidence < 1.0:
        raise ValueError(f"draft_confidence must be in [0, 1), got {draft_confidence}")
    device, stop = prompt_1T.device, set(int(t) for t in stop_tokens)
    sampling = temperature > 0
    stats = GenerationStats()
    start = time.perf_counter()
    cache = model.new_cache()
    if prompt_1T.shape[1] > 1:
        model(prompt_1T[:, :-1], cache=cache, compute_logits=False)
    stats.prefill_seconds = time.perf_counter() - start
    seq = prompt_1T[0].tolist()
    n_new = 0

    def feed_early(token: int, head: bool):
        x = torch.tensor([[token]], device=device)
        logits, exits = model(x, cache=cache, end_layer=E, exit_layers=(E - 1,),
                              compute_logits=head)
        return logits, exits[E - 1]

    while n_new < max_new_tokens:
        n = len(seq)
        k_max = min(draft_len, max_new_tokens - n_new)
        drafts, q_rows, hiddens = [], [], []
        token = seq[-1]
        while len(drafts) < k_max:
            logits, h = feed_early(token, head=True)
            hiddens.append(h)
            row = logits[0, -1]
            if sampling:
                q = distribution(row, temperature, top_p).cpu()
                token = int(torch.multinomial(q, 1, generator=generator))
                q_rows.append(q)
                unsure = draft_confidence and float(q[token]) < draft_confidence
            else:
                token = int(row.argmax())
                unsure = draft_confidence and float(torch.softmax(row, -1)[token]) < draft_confidence
            drafts.append(token)
            if token in stop or unsure:
                break
        k = len(drafts)
        hiddens.append(feed_early(drafts[-1], head=False)[1])
        logits, _ = model(hidden_BTD=torch.cat(hiddens, dim=1), cache=cache, start_layer=E)
        target = logits[0]  # [k + 1, V]: the full model after the last token and each draft
        if sampling:
            a, extra = speculative_accept(distribution(target, temperature, top_p).cpu(),
                                          torch.stack(q_rows), drafts, generator)
        else:
            best = target.argmax(-1).tolist()
            a = next((i for i in range(k) if drafts[i] != best[i]), k)
            extra = best[a]
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        stats.layer_forwards += (k + 1) * L
        stats.layer_passes += (k + 1) * E + (L - E)
        new = (drafts[:a] + [extra])[:max_new_tokens - n_new]
        new = new[:next((i + 1 for i, t in enumerate(new) if t in stop), len(new))]
        seq.extend(new)
        n_new += len(new)
        cache.crop(len(seq) - 1)  # the accepted drafts stay, rejected ones go
        if on_round is not None:
            on_round(seq, cache)
        if seq[-1] in stop:
            break
    stats.new_tokens = n_new
    stats.seconds = time.perf_counter() - start
    return torch.tensor([seq], device=device), stats
