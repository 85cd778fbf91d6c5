"""A Llama-style decoder written for early exits ("LayerSkip: Enabling Early Exit Inference and
Self-Speculative Decoding", Elhoushi et al., 2024, arXiv:2404.16710).

What is implemented: token embedding, L pre-norm blocks (RMSNorm -> rotary attention with
optional grouped-query heads -> residual; RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and
an LM head (tied to the embedding or not). As in the paper, there are no extra exit heads: the
exit after layer l is `head(h_l)`, the model's own final norm + LM head applied to the residual
stream after layer l. Parameter names are Hugging Face Llama's without the `model.` prefix, so
`hf.py` converts by copying.

`forward` is built for exits and for self-speculative decoding:
* it runs any contiguous range of layers [start_layer, end_layer), starting from tokens
  (start_layer == 0) or from a given residual stream `hidden_BTD` (the output of layer
  start_layer - 1), and returns the logits of the last computed layer plus the residual stream
  (or its logits) after each requested exit layer;
* an explicit `KVCache` keeps keys and values per layer, each layer with its own length, so the
  drafting layers may run ahead of the verifying layers, and `crop` undoes rejected drafts;
* `drop_probs` applies the paper's layer dropout per sample (see `_run`);
* with `targets_BT` it returns the training objective of `recipe.py` instead, so the family's
  `loss` needs nothing but `model(...)` (the model may be wrapped by DDP, FSDP or DeepSpeed).

Deviations, and why:
* Layer dropout runs a layer on the kept samples only and scatters the result back; the layer
  is called even when no sample is kept (batch of 0), so every parameter stays in the autograd
  graph and FSDP's per-block hooks and collectives run on every rank. Dropped samples pass
  through unchanged (identity, no rescale), as in the paper.
* RMSNorm upcasts half-precision inputs to float32 (as HF Llama does) but computes float64 in
  float64; rotary angles are computed in float32 from float32 inverse frequencies, exactly as
  HF Llama and Meta's reference do, then cast to the compute dtype.
* No padding / attention mask: all rows of a batch have the same length (byte windows,
  equal-length prompts, batch-1 speculative decoding).
* No attention dropout, no dynamic / YaRN / LongRoPE rotary scaling (`hf.py` refuses those).

Shapes: B batch, T new positions, S key positions (cached + new), D model width, H query heads,
G key/value heads, d head width, F MLP width, V vocabulary, L layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from . import recipe

__all__ = ["Config", "KVCache", "LayerSkipLM", "Block", "RMSNorm", "inverse_frequencies"]


@dataclass
class Config:
    """Hyperparameters of `LayerSkipLM` and its training recipe (the spec's `model:` block)."""

    vocab_size: int = 256
    """Token vocabulary; 256 for raw bytes."""
    dim: int = 256
    """Model (residual stream) width D (HF `hidden_size`)."""
    n_layers: int = 8
    """Number of decoder blocks L."""
    n_heads: int = 8
    """Query heads H."""
    n_kv_heads: int = 0
    """Key/value heads G (grouped-query attention); 0 = n_heads."""
    head_dim: int = 0
    """Width d of one head; 0 = dim // n_heads."""
    mlp_hidden: int = 704
    """SwiGLU hidden width F (HF `intermediate_size`)."""
    rope_theta: float = 10000.0
    """Rotary base wavelength."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """Rotary frequency scaling: none, linear (positions / rope_factor) or Llama 3.1's."""
    rope_factor: float = 1.0
    """Scaling factor of "linear" and "llama3" rotary scaling."""
    rope_low_freq_factor: float = 1.0
    """Llama 3.1 scaling: low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """Llama 3.1 scaling: high-frequency factor."""
    rope_original_max_seq_len: int = 8192
    """Llama 3.1 scaling: the context length of the original pretraining."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head (then there is no `lm_head.weight`)."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    mlp_bias: bool = False
    """Biases on the gate/up/down projections."""
    max_seq_len: int = 2048
    """Longest sequence the model is meant for (HF `max_position_embeddings`); not enforced."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix and embedding."""
    init_from: str = ""
    """A Hugging Face Llama directory whose weights `build` loads; its architecture must equal
    this config's (a mismatch is refused, naming the field). "" = random initialisation."""
    p_max: float = 0.1
    """Layer dropout: the largest drop rate, reached by the last layer (0 disables it)."""
    dropout_schedule: Literal["constant", "exponential"] = "constant"
    """Layer dropout over time S(t): constant 1 (continual pretraining / finetuning) or
    2^(t/T) - 1 (pretraining from scratch)."""
    early_exit_curriculum: Literal["none", "rotational", "gradual"] = "rotational"
    """Which exits the early-exit loss uses at step t: none (last layer only, a plain LM),
    rotational (every rotation_interval-th layer, rotating with the step) or gradual (layers
    switch on from the top down over the first half of training); the last layer always."""
    e_scale: float = 1.0
    """Early-exit loss scale of the early layers (0 = plain LM loss)."""
    rotation_interval: int = 2
    """R of the rotational curriculum: layer l is enabled at step t when l % R == t % R."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_hidden", "max_seq_len",
                     "rotation_interval", "rope_original_max_seq_len", "rope_theta",
                     "rms_norm_eps", "init_std", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "head_dim", "e_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.kv_heads})")
        if self.head_dim == 0 and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}) "
                             f"unless head_dim is set")
        if self.head_size % 2:
            raise ValueError(f"head width {self.head_size} must be even (rotary embeddings)")
        if self.rope_scaling == "llama3" and (self.rope_high_freq_factor
                                              <= self.rope_low_freq_factor):
            raise ValueError("rope_high_freq_factor must exceed rope_low_freq_factor")
        for name, hint in get_type_hints(Config).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                raise ValueError(f"{name} must be one of {get_args(hint)}, got "
                                 f"{getattr(self, name)!r}")
        if not 0.0 <= self.p_max <= 1.0:
            raise ValueError(f"p_max must be in [0, 1], got {self.p_max}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def inverse_frequencies(cfg: Config) -> torch.Tensor:
    """Rotary inverse frequencies [d/2], float32, with the configured scaling (as HF Llama)."""
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        old_len = cfg.rope_original_max_seq_len
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = ((old_len / wavelen - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def offset_causal_mask(past: int, T: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [T, past + T] for T new queries after `past` cached positions (query i sees
    keys up to past + i); None when SDPA needs none (no new positions to hide: T == 1) or its
    own `is_causal` is right (past == 0)."""
    if not past or T == 1:
        return None
    S = past + T
    return torch.arange(S, device=device)[None, :] <= torch.arange(past, S, device=device)[:, None]


def rotate(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout of HF Llama checkpoints."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    return x_BHTd * cos_Td + torch.cat((-x2, x1), dim=-1) * sin_Td


class KVCache:
    """Keys and values per layer, each layer with its own length.

    Buffers grow by doubling; `crop` only moves lengths, so dropping rejected drafts is free.
    `keys(l)` / `values(l)` are views [B, G, length(l), d] of what is valid.
    """

    def __init__(self, n_layers: int):
        self.lengths = [0] * n_layers
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor):
        """Write new keys/values after the valid ones; returns all valid (keys, values)."""
        n, t = self.lengths[layer], k_BGTd.shape[2]
        for buffers, new in ((self._k, k_BGTd), (self._v, v_BGTd)):
            buf = buffers[layer]
            if buf is None or buf.shape[2] < n + t or buf.shape[0] != new.shape[0]:
                grown = new.new_empty(*new.shape[:2], max(64, 2 * (n + t)), new.shape[3])
                if n:
                    grown[:, :, :n] = buf[:, :, :n]
                buffers[layer] = buf = grown
            buf[:, :, n:n + t] = new
        self.lengths[layer] = n + t
        return self.keys(layer), self.values(layer)

    def keys(self, layer: int) -> torch.Tensor:
        return self._k[layer][:, :, :self.lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self._v[layer][:, :, :self.lengths[layer]]

    def crop(self, length: int, layers: Sequence[int] | None = None) -> None:
        """Forget every position at or after `length` in the given layers (default: all)."""
        for i in range(len(self.lengths)) if layers is None else layers:
            self.lengths[i] = min(self.lengths[i], length)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, index: int):
        super().__init__()
        self.index, self.n_heads, self.n_kv = index, cfg.n_heads, cfg.kv_heads
        self.d = cfg.head_size
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.d, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * self.d, cfg.dim, bias=bias)

    def forward(self, x_BTD, cos_Td, sin_Td, cache: KVCache | None = None,
                mask_TS: torch.Tensor | None = None):
        """`mask_TS`: the `offset_causal_mask` for this layer's cached length, if the caller
        already has it (one per forward, shared by the layers); computed here otherwise."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.d).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.d).transpose(1, 2)
        q, k = rotate(q, cos_Td, sin_Td), rotate(k, cos_Td, sin_Td)
        past = 0
        if cache is not None:
            past = cache.lengths[self.index]
            k, v = cache.append(self.index, k, v)
        if mask_TS is None:
            mask_TS = offset_causal_mask(past, T, x_BTD.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS,
                                           is_causal=not past and T > 1,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block, the FSDP unit. Works on a batch of 0 rows (layer dropout)."""

    def __init__(self, cfg: Config, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD, cos_Td, sin_Td, cache: KVCache | None = None,
                mask_TS: torch.Tensor | None = None):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_Td, sin_Td, cache,
                                       mask_TS)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class LayerSkipLM(nn.Module):
    """Decoder LM whose every layer can exit through the shared final norm + LM head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # (cos, sin) tables per (device, dtype); not buffers, so that .to(dtype) never rounds
        # the float32 angles they are computed from
        self._rotary: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Logits of any layer's residual stream: final norm + LM head (the paper's exit)."""
        weight = self.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return F.linear(self.norm(h_BTD), weight)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def rotary(self, start: int, T: int, device: torch.device, dtype: torch.dtype):
        """(cos, sin) [T, d] for positions start .. start + T - 1.

        Sliced from a table per device and dtype, computed once for a power-of-two number of
        positions (and again, longer, when a later position is asked for): a decoding step then
        costs two slices instead of the half-dozen small ops of computing its angles, which
        matters at batch 1."""
        cos, sin = self._rotary.get((device, dtype), (None, None))
        if cos is None or cos.shape[0] < start + T:
            n = 256
            while n < start + T:
                n *= 2
            inv_freq = inverse_frequencies(self.cfg).to(device)
            angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            self._rotary[(device, dtype)] = (cos, sin)
        return cos[start:start + T], sin[start:start + T]

    def forward(self, tokens_BT: torch.Tensor | None = None, *,
                hidden_BTD: torch.Tensor | None = None, cache: KVCache | None = None,
                start_layer: int = 0, end_layer: int | None = None,
                exit_layers: Sequence[int] | Literal["all"] = (), exit_logits: bool = False,
                compute_logits: bool = True, drop_probs: Sequence[float] | None = None,
                targets_BT: torch.Tensor | None = None, step: int = 0, total_steps: int = 0):
        """Run layers [start_layer, end_layer), or compute the training objective.

        Args:
            tokens_BT: int64 tokens; required when start_layer == 0.
            hidden_BTD: the residual stream entering layer start_layer (the output of layer
                start_layer - 1); required when start_layer > 0.
            cache: per-layer keys/values; each layer appends the new positions to its own
                entry, and their rotary positions start at that layer's cached length.
            start_layer, end_layer: the layer range; end_layer None = all layers. An empty
                range just applies the head to `hidden_BTD`.
            exit_layers: layers (in the range) whose output to return, or "all".
            exit_logits: return head(h_l) instead of h_l for the exits.
            compute_logits: apply the head to the last computed layer's output.
            drop_probs: per-layer drop probabilities [L] for layer dropout (training mode
                only; per sample; not with a cache).
            targets_BT: when given, return the early-exit training objective of `recipe.py`
                for step `step` of `total_steps` as (loss, metrics) instead.
        Returns:
            (logits [B, T, V] of the last computed layer or None, {l: exit tensor}).
        """
        if targets_BT is not None:
            return recipe.objective(self._run, self.cfg, tokens_BT, targets_BT, step,
                                    total_steps, self.training)
        return self._run(tokens_BT, hidden_BTD, cache, start_layer, end_layer, exit_layers,
                         exit_logits, compute_logits, drop_probs)

    def _run(self, tokens_BT=None, hidden_BTD=None, cache=None, start_layer=0, end_layer=None,
             exit_layers=(), exit_logits=False, compute_logits=True, drop_probs=None):
        L = self.cfg.n_layers
        end = L if end_layer is None else end_layer
        if not 0 <= start_layer <= end <= L:
            raise ValueError(f"need 0 <= start_layer <= end_layer <= {L}, got "
                             f"[{start_layer}, {end})")
        exits = set(range(start_layer, end)) if exit_layers == "all" else set(exit_layers)
        if not exits <= set(range(start_layer, end)):
            raise ValueError(f"exit_layers {sorted(exits)} must lie in [{start_layer}, {end})")
        if start_layer == 0:
            if tokens_BT is None:
                raise ValueError("tokens_BT is required when start_layer == 0")
            h = self.embed_tokens(tokens_BT)
        elif hidden_BTD is None:
            raise ValueError("hidden_BTD is required when start_layer > 0")
        else:
            h = hidden_BTD
        B, T = h.shape[:2]

        keep_LB = None
        if drop_probs is not None and self.training and any(p > 0 for p in drop_probs):
            if cache is not None:
                raise ValueError("layer dropout cannot be combined with a KV cache")
            if len(drop_probs) != L:
                raise ValueError(f"drop_probs needs {L} entries, got {len(drop_probs)}")
            # one draw per (layer, sample) whatever the probabilities: a fixed RNG consumption
            probs_L = torch.tensor([float(p) for p in drop_probs], device=h.device)
            keep_LB = torch.rand(L, B, device=h.device) >= probs_L[:, None]

        # rotary tables and attention mask per cached length, shared by the layers that have it
        # (all of them, except while drafting layers run ahead of verifying ones)
        per_past: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        out: dict[int, torch.Tensor] = {}
        for i in range(start_layer, end):
            past = cache.lengths[i] if cache is not None else 0
            if past not in per_past:
                per_past[past] = (*self.rotary(past, T, h.device, h.dtype),
                                  offset_causal_mask(past, T, h.device))
            cos, sin, mask = per_past[past]
            block = self.layers[i]
            if keep_LB is None or drop_probs[i] == 0:
                h = block(h, cos, sin, cache, mask)
            else:  # per-sample layer dropout; the block runs even on 0 kept rows
                idx = keep_LB[i].nonzero()[:, 0]
                h = h.index_copy(0, idx, block(h.index_select(0, idx), cos, sin, cache, mask))
            if i in exits:
                out[i] = h
        logits = self.head(h) if compute_logits else None
        if exit_logits:
            out = {i: logits if i == end - 1 and logits is not None else self.head(x)
                   for i, x in out.items()}
        return logits, out
