"""LayerSkip's training recipe: layer dropout, the early-exit loss and their curricula
("LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding", Elhoushi et al., 2024,
arXiv:2404.16710, Section 4.1 and 4.2).

Everything here is a pure function of (config, step t, total steps T), so a run resumed from a
checkpoint at step t continues every schedule exactly; `curriculum_state` reports that state.

Layer dropout (Sec. 4.1): layer l of a sample is skipped with probability
    p(l, t) = S(t) * D(l) * p_max,   D(l) = 2^(l / (L - 1)) - 1   (D(0) = 0: layer 0 never dropped),
    S(t) = 1 ("constant") or 2^(t / T) - 1 ("exponential", pretraining from scratch).
Early-exit loss (Sec. 4.2):
    J(t) = sum_l e~(t, l) * CE(head(h_l), y),   e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i),
    e(l) = e_scale * sum_{i=0..l} i                     for l < L - 1,
    e(L - 1) = (L - 1) + e_scale * sum_{i=0..L-2} i,
i.e. the weights grow quadratically with depth and the last layer's own increment (L - 1) is not
scaled by e_scale. Curricula C(t, l): "rotational" enables l when l % R == t % R; "gradual"
enables l once t >= (L - 1 - l) * T / (2L), so one more layer switches on every T / (2L) steps from
the top down and all are on by T / 2; "none" enables only the last layer. The last layer is
always enabled, so the true final output is always in the loss. h_l is the residual stream after
layer l (0-based): the exit after layer l uses layer l's output.

Deviations, and why:
* e(0) = 0, so layer 0's exit never contributes (as the formula says); its CE is not computed.
* The gradual curriculum's switch-on times are exact multiples of T / (2L) rather than of the
  integer interval floor(T / 2L), which would be 0 for short runs.
* S(t) uses t / T (not t / (T - 1)): S reaches 1 at the end of training.
* Exit logits are computed in one forward with the model's own head (no extra exit heads);
  the cross-entropies are averaged over tokens, half-precision logits upcast to float32.
* We follow the paper's formulas, not torchtune's LayerSkip recipe, whose "sum_l" scale
  accumulates over the enabled layers only and whose gradual curriculum is a stateful counter.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import Config

Batch = dict[str, torch.Tensor]
EVAL_LOGITS_BUDGET = 1 << 26  # logits elements (all exits) held at once by `evaluate`


def layer_scale(layer: int, n_layers: int) -> float:
    """D(l) = 2^(l / (L - 1)) - 1 in [0, 1]; 0 for a one-layer model."""
    return 0.0 if n_layers < 2 else 2.0 ** (layer / (n_layers - 1)) - 1.0


def dropout_scale(cfg: Config, step: int, total_steps: int) -> float:
    """S(t): 1, or 2^(t / T) - 1 for the exponential schedule (t clamped to [0, T])."""
    if cfg.dropout_schedule == "constant":
        return 1.0
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return 2.0 ** (min(max(step, 0), total_steps) / total_steps) - 1.0


def drop_probs(cfg: Config, step: int, total_steps: int) -> list[float]:
    """p(l, t) for every layer."""
    if cfg.p_max == 0:
        return [0.0] * cfg.n_layers
    s = dropout_scale(cfg, step, total_steps)
    return [s * layer_scale(l, cfg.n_layers) * cfg.p_max for l in range(cfg.n_layers)]


def exit_scale(layer: int, n_layers: int, e_scale: float) -> float:
    """The paper's unnormalised e(l): e_scale * sum_{i=0..l} i below the last layer and
    (L - 1) + e_scale * sum_{i=0..L-2} i for the last, so layer 0's exit weighs 0 and the
    weights grow roughly quadratically. (torchtune's `sum_l_loss_scale` counts from 1 over the
    enabled layers instead, which also trains the first exit; we keep the paper's form.)"""
    if layer < n_layers - 1:
        return e_scale * layer * (layer + 1) / 2
    return (n_layers - 1) + e_scale * (n_layers - 2) * (n_layers - 1) / 2


def enabled_exits(cfg: Config, step: int, total_steps: int) -> list[int]:
    """Layers whose exit the curriculum C(t, l) enables at step t (always the last)."""
    L = cfg.n_layers
    if cfg.early_exit_curriculum == "none":
        on = []
    elif cfg.early_exit_curriculum == "rotational":
        on = [l for l in range(L - 1) if l % cfg.rotation_interval == step % cfg.rotation_interval]
    else:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        switched_on = 2 * L * max(step, 0) // total_steps  # layers on below the last one
        on = [l for l in range(L - 1) if L - 1 - l <= switched_on]
    return on + [L - 1]


def exit_weights(cfg: Config, step: int, total_steps: int) -> dict[int, float]:
    """e~(t, l) for the enabled layers (they sum to 1; some may be 0, e.g. layer 0)."""
    enabled = enabled_exits(cfg, step, total_steps)
    raw = {l: exit_scale(l, cfg.n_layers, cfg.e_scale) for l in enabled}
    total = sum(raw.values())
    if total == 0:  # a one-layer model: e(L - 1) = 0
        return {l: float(l == cfg.n_layers - 1) for l in enabled}
    return {l: w / total for l, w in raw.items()}


def curriculum_state(cfg: Config, step: int, total_steps: int) -> dict:
    """JSON description of every step-driven schedule at step t (for checkpoints and logs)."""
    weights = exit_weights(cfg, step, total_steps)
    return {
        "step": step,
        "total_steps": total_steps,
        "early_exit_curriculum": cfg.early_exit_curriculum,
        "exit_layers": sorted(weights),
        "exit_weights": [weights[l] for l in sorted(weights)],
        "dropout_schedule": cfg.dropout_schedule,
        "dropout_scale": dropout_scale(cfg, step, total_steps) if cfg.p_max else 0.0,
        "drop_probs": drop_probs(cfg, step, total_steps),
    }


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the cross-entropy; wider dtypes stay."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def objective(run: Callable, cfg: Config, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
              step: int, total_steps: int, training: bool):
    """The early-exit loss J(t) with layer dropout; called inside the model's forward.

    Args:
        run: the unwrapped model's layer runner (`LayerSkipLM._run`).
        cfg: the model's config.
        tokens_BT, targets_BT: inputs and next-token targets.
        step, total_steps: where training is; every schedule is a function of them.
        training: apply layer dropout (the module's training flag).
    Returns:
        (J, metrics): metrics are detached scalars with the same keys at every step.
    """
    weights = {l: w for l, w in exit_weights(cfg, step, total_steps).items() if w > 0}
    probs = drop_probs(cfg, step, total_steps) if training else None
    _, exits = run(tokens_BT, exit_layers=sorted(weights), exit_logits=True, drop_probs=probs)
    targets = targets_BT.flatten()
    losses = {l: F.cross_entropy(_upcast(exits[l].flatten(0, 1)), targets) for l in weights}
    loss = sum(weights[l] * losses[l] for l in weights)
    final = losses[cfg.n_layers - 1].detach()
    metrics = {
        "loss": loss.detach(),
        "final_loss": final,
        "bits_per_byte": final / math.log(2),
        "exits_enabled": torch.tensor(float(len(weights))),
        "dropout_scale": torch.tensor(dropout_scale(cfg, step, total_steps) if cfg.p_max else 0.0),
    }
    return loss, metrics


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    """Family loss: J(t) on next-token prediction of the batch's `tokens` [B, T + 1].

    Only calls `model(...)`, so DDP / FSDP / DeepSpeed wrappers are fine.
    """
    tokens = batch["tokens"]
    return model(tokens[:, :-1], targets_BT=tokens[:, 1:], step=step, total_steps=total_steps)


def evaluate(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-exit metrics on one batch: `exit_loss/l{i}` (CE of the exit after layer i, nats),
    `agree/l{i}` (top-1 agreement with the last layer), `loss` (the last layer's CE) and
    `bits_per_byte`. Only calls `model(...)`; the batch is processed in chunks so that the
    logits of all exits stay under EVAL_LOGITS_BUDGET elements."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    sums: dict[str, torch.Tensor] = {}
    start, chunk = 0, 1  # the first call (one row) tells the number of layers and the vocabulary
    while start < B:
        _, exits = model(inputs[start:start + chunk], exit_layers="all", exit_logits=True)
        last = exits[max(exits)]
        y = targets[start:start + chunk].flatten()
        final_top1 = last.argmax(-1).flatten()
        for l, logits in exits.items():
            flat = _upcast(logits.flatten(0, 1))
            ce = F.cross_entropy(flat, y, reduction="sum")
            agree = (flat.argmax(-1) == final_top1).sum()
            sums[f"exit_loss/l{l}"] = sums.get(f"exit_loss/l{l}", 0) + ce
            sums[f"agree/l{l}"] = sums.get(f"agree/l{l}", 0) + agree.float()
        start += chunk
        chunk = max(1, EVAL_LOGITS_BUDGET // (len(exits) * T * last.shape[-1]))
    metrics = {k: (v / (B * T)).detach() for k, v in sums.items()}
    final = metrics[f"exit_loss/l{max(exits)}"]
    metrics["loss"] = final
    metrics["bits_per_byte"] = final / math.log(2)
    return metrics
