"""Universal Physics Transformer ("Universal Physics Transformers: A Framework For Efficiently
Scaling Neural Operators", Alkin et al., NeurIPS 2024, arXiv:2402.12365).

What is implemented (Sec. 3 of the paper):
* Encoder: input points of any number and position, each with its field values ->
  supernode pooling (a radius graph from the input points to S supernodes, one message per edge
  from an MLP, mean aggregation per supernode) -> transformer blocks over the S supernode tokens
  -> perceiver pooling: M learned queries cross-attend to them, giving a fixed-size latent [M, D]
  whatever the number of inputs.
* Approximator: transformer blocks on the latent tokens; one forward advances one timestep.
  It is conditioned on the timestep and the physical parameters (viscosity, forcing, ...) by
  adaptive layer norm in DiT's adaLN-Zero form (Peebles & Xie, 2023): every block's scales,
  shifts and gates are regressed from the conditioning vector, gates initialised at zero.
* Decoder: perceiver cross-attention from query positions to the latent tokens. Queries never
  attend to each other, so the value at a query does not depend on which other points are
  queried, and a field can be decoded anywhere, in chunks of any size.
* Inverse encoding and inverse decoding (Sec. 3.2), each switched on by a positive weight
  (`UPT.forward` computes what they need; the losses are in the family's `loss`):
  inverse encoding decodes the encoder's latent of u_t at the input points and asks for u_t
  back (the latent must hold the state, so that latents can be decoded after any number of
  latent steps); inverse decoding re-encodes the decoded prediction of u_{t+1} and asks for the
  predicted latent back (encoder and decoder invert each other on the latent's manifold, so a
  latent rollout and a physical rollout agree).
* Rollouts: `rollout_latent` encodes once and steps the approximator (the input size only enters
  the first step); `rollout_physical` decodes at the input points and re-encodes every step.

Deviations from the paper / the reference code (ml-jku/UPT), and why:
* Periodic domain: positions live on the unit torus, so position embeddings are integer-frequency
  Fourier features (periodic), and the radius graph uses minimum-image offsets.
* Messages are MLP(embed(values_j) + pos_embed(x_j), (x_j - x_s) / r), i.e. they see the offset
  to the supernode, not the supernode's own input features; supernodes are therefore just
  positions (`supernode_pos`), which the data pipeline samples from the input points as in the
  paper, and which tests may fix independently of the inputs (the discretisation-convergence
  property needs that).
* The neighbour cap keeps each supernode's `max_neighbours` nearest inputs (0: no cap), not the
  first ones found, so the result does not depend on the order of the inputs.
* The inverse-decoding target is the predicted latent with gradients stopped (the encoder learns
  to invert the decoder; the approximator is not pulled towards what the encoder can reproduce).
* The perceiver pooling's learned queries start at unit scale rather than the customary
  std 0.02: with tiny queries every latent token starts as nearly the same average of the
  supernodes, and training sits on a long plateau until the attention learns to tell tokens
  apart (an autoencoding probe: reconstruction MSE 0.70 vs 0.26 after 200 steps).
* Sizes are small (CPU); no drop path, no mixed precision. The decoder is not conditioned.

Shapes: B batch, N input points, S supernodes, M latent tokens, Q query points, D width,
C field channels, P physical parameters, E edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    """Hyperparameters of `UPT` (the job spec's `model:` block minus `family`)."""

    dim: int = 96
    """Width D of every token."""
    heads: int = 4
    """Attention heads (D must be divisible by it)."""
    encoder_depth: int = 2
    """Transformer blocks over the supernode tokens."""
    approximator_depth: int = 3
    """DiT blocks of the approximator (one latent timestep per forward)."""
    decoder_depth: int = 1
    """Perceiver cross-attention blocks of the decoder."""
    latent_tokens: int = 32
    """M, the fixed number of latent tokens."""
    radius: float = 0.15
    """Radius of the supernode graph, in units of the (unit) domain."""
    max_neighbours: int = 32
    """Inputs per supernode (the nearest ones within the radius); 0 = all within the radius."""
    pos_freqs: int = 8
    """Fourier frequencies per coordinate of the position embeddings."""
    mlp_ratio: float = 2.0
    """MLP hidden width as a multiple of D."""
    channels: int = 1
    """C, field values per point (in and out)."""
    n_params: int = 2
    """P, physical parameters the approximator is conditioned on (the data decide it)."""
    inverse_encoding_weight: float = 0.0
    """Weight of the inverse-encoding loss (decode the encoded input); 0 switches it off."""
    inverse_decoding_weight: float = 0.0
    """Weight of the inverse-decoding loss (re-encode the decoded output); 0 switches it off."""

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "encoder_depth", "approximator_depth", "decoder_depth",
                     "latent_tokens", "pos_freqs", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0 < self.radius <= 0.5:
            raise ValueError(f"radius must be in (0, 0.5] (the domain is the unit torus), got {self.radius}")
        if self.max_neighbours < 0:
            raise ValueError(f"max_neighbours must be 0 (no cap) or more, got {self.max_neighbours}")
        if self.n_params < 0:
            raise ValueError(f"n_params must be 0 or more, got {self.n_params}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("inverse_encoding_weight", "inverse_decoding_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")


def periodic_offsets(src_BN2: torch.Tensor, dst_BS2: torch.Tensor) -> torch.Tensor:
    """Minimum-image offsets x_n - x_s on the unit torus: [B, S, N, 2] in [-0.5, 0.5)."""
    d = src_BN2[:, None, :, :] - dst_BS2[:, :, None, :]
    return d - torch.floor(d + 0.5)


def radius_graph(input_pos: torch.Tensor, supernode_pos: torch.Tensor, radius: float,
                 max_neighbours: int = 0):
    """Edges from input points to supernodes within `radius` (periodic distance).

    With max_neighbours > 0 each supernode keeps only its nearest max_neighbours inputs
    (inputs tied with the last kept one at exactly the same distance are kept too).
    Returns (batch [E], supernode [E], input [E], offset [E, 2]) with offset = x_input - x_super.
    """
    offsets = periodic_offsets(input_pos, supernode_pos)  # [B, S, N, 2]
    dist = offsets.norm(dim=-1)
    inside = dist <= radius
    if max_neighbours and dist.shape[-1] > max_neighbours:
        kth = dist.topk(max_neighbours, dim=-1, largest=False).values[..., -1:]
        inside &= dist <= kth
    b, s, n = inside.nonzero(as_tuple=True)
    return b, s, n, offsets[b, s, n]


class FourierEmbedding(nn.Module):
    """Positions on the unit torus -> D: sin/cos(2 pi m x_d), m = 1..F, then a linear map."""

    def __init__(self, dim: int, freqs: int, coords: int = 2):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, freqs + 1, dtype=torch.float32),
                             persistent=False)
        self.proj = nn.Linear(2 * freqs * coords, dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        angles = (pos[..., None] * self.freqs.to(pos.dtype)).flatten(-2)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of a (real-valued) timestep: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t_B.dtype, device=t_B.device) / half)
    angles = t_B[:, None] * freqs
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class Attention(nn.Module):
    """Multi-head attention of queries x [B, L, D] over a context [B, K, D] (self when context is x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        h = self.heads
        q = self.q(x).view(b, l, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, l, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = mlp(dim, round(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Perceiver block: queries x + CrossAttn(LN(x), LN(context)), then x + MLP(LN(x)).
    There is no attention among the queries: each query row is computed on its own."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = mlp(dim, round(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie, 2023): the conditioning
    vector c [B, D] gives per-block shift, scale and gate of both sub-layers; the gates start
    at zero, so an untrained approximator is the identity map on the latent."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.mlp = mlp(dim, round(dim * mlp_ratio), dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_BD)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class SupernodePooling(nn.Module):
    """Inputs [B, N] -> supernode tokens [B, S, D] by messages on a radius graph, mean-aggregated."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.radius, self.max_neighbours = cfg.radius, cfg.max_neighbours
        self.value_embed = nn.Linear(cfg.channels, d)
        self.pos_embed = FourierEmbedding(d, cfg.pos_freqs)
        self.message = mlp(d + 2, round(d * cfg.mlp_ratio), d)
        self.supernode_embed = FourierEmbedding(d, cfg.pos_freqs)

    def forward(self, input_pos: torch.Tensor, input_values: torch.Tensor,
                supernode_pos: torch.Tensor) -> torch.Tensor:
        b, s = supernode_pos.shape[:2]
        eb, es, en, offset = radius_graph(input_pos, supernode_pos, self.radius, self.max_neighbours)
        h = self.value_embed(input_values[eb, en]) + self.pos_embed(input_pos[eb, en])
        messages = self.message(torch.cat([h, offset / self.radius], dim=-1))  # [E, D]
        target = eb * s + es
        summed = messages.new_zeros(b * s, messages.shape[-1]).index_add_(0, target, messages)
        count = torch.bincount(target, minlength=b * s).clamp_min(1).to(messages.dtype)
        pooled = (summed / count[:, None]).view(b, s, -1)  # a supernode without inputs gets 0
        return pooled + self.supernode_embed(supernode_pos)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pooling = SupernodePooling(cfg)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.encoder_depth))
        # Unit-scale queries, not the usual 0.02: the latent tokens are then distinct from the
        # first step, which shortens the initial plateau of training several-fold (see the
        # module docstring).
        self.queries = nn.Parameter(torch.randn(cfg.latent_tokens, cfg.dim))
        self.perceiver = CrossBlock(cfg.dim, cfg.heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, input_pos, input_values, supernode_pos) -> torch.Tensor:
        x = self.pooling(input_pos, input_values, supernode_pos)
        for block in self.blocks:
            x = block(x)
        latent = self.perceiver(self.queries.expand(x.shape[0], -1, -1), self.norm(x))
        return latent  # [B, M, D]


class Approximator(nn.Module):
    """Latent [B, M, D] at step t -> latent at step t + 1, conditioned on t and the parameters."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.param_mlp = (nn.Sequential(nn.Linear(cfg.n_params, d), nn.SiLU(), nn.Linear(d, d))
                          if cfg.n_params else None)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.approximator_depth))

    def condition(self, timestep_B: torch.Tensor, params_BP: torch.Tensor | None) -> torch.Tensor:
        c = self.time_mlp(timestep_embedding(timestep_B, self.dim))
        if self.param_mlp is not None:
            c = c + self.param_mlp(params_BP)
        return c

    def forward(self, latent: torch.Tensor, timestep_B: torch.Tensor, params_BP: torch.Tensor | None):
        c = self.condition(timestep_B.to(latent.dtype), params_BP)
        for block in self.blocks:
            latent = block(latent, c)
        return latent


class Decoder(nn.Module):
    """Latent [B, M, D] and query positions [B, Q, 2] -> field values [B, Q, C]."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.query_embed = nn.Sequential(FourierEmbedding(d, cfg.pos_freqs), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(CrossBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.norm_latent = nn.LayerNorm(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.channels)

    def forward(self, latent: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        context = self.norm_latent(latent)
        q = self.query_embed(query_pos)
        for block in self.blocks:
            q = block(q, context)
        return self.head(self.norm(q))


class UPT(nn.Module):
    """Encoder -> approximator -> decoder. `forward` is one training step's worth of outputs."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.approximator = Approximator(cfg)
        self.decoder = Decoder(cfg)
        # The training data's normalisation (field values are divided by value_scale, physical
        # parameters standardised with param_mean / param_std), copied in by the family's loss
        # from the batches that carry it, so a checkpoint knows its own units. NaN until then.
        nan = float("nan")
        self.register_buffer("value_scale", torch.tensor(nan))
        self.register_buffer("param_mean", torch.full((cfg.n_params,), nan))
        self.register_buffer("param_std", torch.full((cfg.n_params,), nan))

    NORMALISATION = ("value_scale", "param_mean", "param_std")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the model kept its normalisation: those buffers stay unset
        for name in self.NORMALISATION:
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, input_pos, input_values, supernode_pos) -> torch.Tensor:
        return self.encoder(input_pos, input_values, supernode_pos)

    def step(self, latent, timestep, params) -> torch.Tensor:
        return self.approximator(latent, timestep, params)

    def decode(self, latent, query_pos) -> torch.Tensor:
        return self.decoder(latent, query_pos)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs for one transition u_t -> u_{t+1} of a batch (see the family's dataset):

        "prediction" [B, Q, C] = decode(step(encode(u_t)), output_pos); with inverse encoding on,
        "reconstruction" [B, N, C] = decode(encode(u_t), input_pos); with inverse decoding on,
        "reencoded" = encode(prediction at output_pos) and "predicted_latent" (detached) [B, M, D].
        Everything runs inside forward so a DDP/FSDP wrapper sees every parameter use.
        """
        latent = self.encode(batch["input_pos"], batch["input_values"], batch["supernode_pos"])
        params = batch.get("params")
        nxt = self.step(latent, batch["timestep"], params)
        out = {"prediction": self.decode(nxt, batch["output_pos"])}
        if self.cfg.inverse_encoding_weight > 0:
            out["reconstruction"] = self.decode(latent, batch["input_pos"])
        if self.cfg.inverse_decoding_weight > 0:
            out["reencoded"] = self.encode(batch["output_pos"], out["prediction"], batch["supernode_pos"])
            out["predicted_latent"] = nxt.detach()
        return out

    @torch.no_grad()
    def rollout_latent(self, input_pos, input_values, supernode_pos, timestep, params, steps: int,
                       query_pos) -> torch.Tensor:
        """Encode once, advance `steps` latent steps, decode each at query_pos: [B, steps, Q, C]."""
        latent = self.encode(input_pos, input_values, supernode_pos)
        t = timestep.to(latent.dtype)
        out = []
        for k in range(steps):
            latent = self.step(latent, t + k, params)
            out.append(self.decode(latent, query_pos))
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def rollout_physical(self, input_pos, input_values, supernode_pos, timestep, params, steps: int,
                         query_pos) -> torch.Tensor:
        """Every step: encode at the input points, advance one step, decode at the input points
        (the next step's input) and at query_pos (the output): [B, steps, Q, C]."""
        values = input_values
        out = []
        for k in range(steps):
            latent = self.step(self.encode(input_pos, values, supernode_pos), timestep.to(values.dtype) + k, params)
            values = self.decode(latent, input_pos)
            out.append(self.decode(latent, query_pos))
        return torch.stack(out, dim=1)
