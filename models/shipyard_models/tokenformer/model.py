"""TokenFormer byte-level language model ("TokenFormer: Rethinking Transformer Scaling with
Tokenized Model Parameters", Wang et al., 2024, arXiv:2410.23168).

What is implemented: every linear projection of a decoder block is a Pattention layer
(token-parameter attention),

    Pattention(X) = Theta(X K^T) V,   Theta(A)_ij = GeLU(A_ij * tau / ||A_i||_2),

with learnable key tokens K [n, d_in] and value tokens V [n, d_out]; the row norm is the L2 norm
over the n parameter tokens (the paper's modified softmax, Eq. 5). The query, key, value and
output projections of attention each use `qkv_tokens` parameter tokens, and the whole feed-forward
block is one Pattention layer with `ffn_tokens` tokens (Sec. 3.3). Token-token attention is
ordinary causal multi-head attention with rotary position embeddings. Blocks are pre-norm with a
non-parametric layer norm (no scale, no bias) before attention, before the feed-forward Pattention
and at the end; the byte embedding is tied to the output head.

Because a parameter token with a zero key contributes GeLU(0) * v = 0, appending zero keys leaves
every output unchanged -- provided tau does not move. `growth.py` grows models this way, or by
splitting every token into copies whose values sum to the old one.

Deviations, and why:
* tau is a buffer set when the layer is created, tau = sqrt(initial n), and changed only by
  growth. The released code uses sqrt(current n): then appending m zero keys rescales every
  activation by sqrt((n + m) / n) and growth is not function-preserving. Zero-key growth keeps tau;
  split growth (each token split into k copies) multiplies it by sqrt(k), which is again sqrt(n)
  when the token count grew k-fold. Either way a grown model computes exactly what the small one
  did (tests/models/tokenformer/test_tokenformer_growth.py).
* Each layer's value tokens are stored divided by a buffer `value_scale` (1 unless split growth
  changed it): the output is Theta(X K^T) V * value_scale. Split growth sets it to 1 / k, so that
  Adam, whose step does not depend on a parameter's scale, moves a copy's value by 1 / k of the old
  token's step -- the k copies together by one old step, rather than k (growth.py). Not in the
  paper, where values are plain parameters (value_scale = 1 is that model exactly).
* The row norm is clamped below at 1e-12 (the released code divides by it unguarded); only an
  all-zero input row reaches the clamp.
* No biases, no dropout, no attention-score normalisation tricks; parameter tokens and the
  embedding are initialised N(0, init_std^2) (the released code's default std is also 0.02).

Shapes: B batch, T time, D model width, H heads, K head width (D / H), N parameter tokens,
V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    """Hyperparameters of `TokenFormerLM` (the job spec's `model:` block minus `family`)."""

    vocab_size: int = 256
    """Token vocabulary; 256 for raw bytes."""
    dim: int = 128
    """Model (residual stream) width D."""
    n_layers: int = 4
    """Decoder blocks."""
    n_heads: int = 4
    """Attention heads; must divide dim."""
    qkv_tokens: int = 128
    """Parameter tokens of each of the query, key, value and output Pattention layers."""
    ffn_tokens: int = 512
    """Parameter tokens of the feed-forward Pattention layer."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables cover."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of the non-parametric layer norm."""
    init_std: float = 0.02
    """Standard deviation of the initial parameter tokens and embedding."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "qkv_tokens", "ffn_tokens",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"the head width dim / n_heads = {self.dim // self.n_heads} must be "
                             "even for rotary embeddings")


class Pattention(nn.Module):
    """Token-parameter attention: [..., d_in] -> [..., d_out] through N key/value parameter tokens.

    `tau` is set at construction (sqrt of the initial N) and stored with the weights, as is
    `value_scale` (1 at construction, the values' factor: see the module docstring); only `grow`
    changes them (see growth.py).
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, init_std: float = 0.02):
        super().__init__()
        self.key_tokens = nn.Parameter(torch.randn(n_tokens, d_in) * init_std)
        self.value_tokens = nn.Parameter(torch.randn(n_tokens, d_out) * init_std)
        self.register_buffer("tau", torch.tensor(math.sqrt(n_tokens)))
        self.register_buffer("value_scale", torch.tensor(1.0))

    @property
    def n_tokens(self) -> int:
        return self.key_tokens.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.key_tokens.t()  # [..., N]
        norm = scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (F.gelu(scores * (self.tau / norm)) @ self.value_tokens) * self.value_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before `value_scale` existed: their values are unscaled
        state_dict.setdefault(prefix + "value_scale", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        d_in, d_out = self.key_tokens.shape[1], self.value_tokens.shape[1]
        return f"{d_in} -> {d_out}, tokens={self.n_tokens}, tau={float(self.tau):.4g}" + (
            f", value_scale={float(self.value_scale):.4g}" if float(self.value_scale) != 1 else "")


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-parametric layer norm: zero mean, unit variance, no scale and no bias."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim / 2] of the rotary angles."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x_BHTK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive halves (x1, x2) of each head by the position's angles."""
    x1, x2 = x_BHTK.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal rotary multi-head attention whose four projections are Pattention layers."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        d, n = cfg.dim, cfg.qkv_tokens
        self.query = Pattention(d, d, n, cfg.init_std)
        self.key = Pattention(d, d, n, cfg.init_std)
        self.value = Pattention(d, d, n, cfg.init_std)
        self.out = Pattention(d, d, n, cfg.init_std)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        heads = lambda t: t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # noqa: E731
        q = apply_rotary(heads(self.query(x_BTD)), cos, sin)
        k = apply_rotary(heads(self.key(x_BTD)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, heads(self.value(x_BTD)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """x + Attention(LN(x)), then x + FFN-Pattention(LN(x)). The FSDP unit."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg)
        self.ffn = Pattention(cfg.dim, cfg.dim, cfg.ffn_tokens, cfg.init_std)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(layer_norm(x_BTD, self.eps), cos, sin)
        return x_BTD + self.ffn(layer_norm(x_BTD, self.eps))


class TokenFormerLM(nn.Module):
    """Byte-level TokenFormer: tied embedding, L blocks, final non-parametric layer norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Derived from the config, so not saved; computed in float64 and cast on use.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for every position."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BT)
        cos, sin = (t[:T].to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        for block in self.blocks:
            x = block(x, cos, sin)
        return layer_norm(x, self.cfg.norm_eps) @ self.embed.weight.t()

    @torch.no_grad()
    def generate(self, prompt_BT: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation (no KV cache: each new token reruns the window)."""
        out = prompt_BT
        for _ in range(max_new_tokens):
            logits = self(out[:, -self.cfg.max_seq_len:])[:, -1]
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out


def count_parameters(cfg: Config) -> int:
    """Trainable parameters of a model with this config (embedding counted once: it is tied)."""
    d = cfg.dim
    per_block = 4 * cfg.qkv_tokens * 2 * d + cfg.ffn_tokens * 2 * d
    return cfg.vocab_size * d + cfg.n_layers * per_block


def flops_per_token(cfg: Config, seq_len: int) -> float:
    """Analytic training FLOPs per token (forward + backward = 3x forward; multiply-add = 2).

    Forward per block: each Pattention does two matmuls (d_in x N and N x d_out), attention two
    more over the causal context (counted as the full T x T product, as is customary), and the
    tied output head one V x D product.
    """
    d = cfg.dim
    pattention = 2 * (4 * cfg.qkv_tokens * 2 * d + cfg.ffn_tokens * 2 * d)
    attention = 2 * 2 * seq_len * d
    head = 2 * cfg.vocab_size * d
    return 3.0 * (cfg.n_layers * (pattention + attention) + head)
