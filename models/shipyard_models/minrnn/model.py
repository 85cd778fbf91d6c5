"""minGRU / minLSTM byte-level language model ("Were RNNs All We Needed?", Feng et al., 2024,
arXiv:2410.01201).

What is implemented: the paper's minimal GRU and LSTM cells (gates depend on x_t only, so the
recurrence is linear in h and trains with a parallel scan), in log-space-safe form (g keeps the
candidate state positive, Appendix B.3) and with minLSTM's length-independent normalised gates
f' = f / (f + i), i' = i / (f + i). Stacked as the usual pre-norm residual blocks
x + Cell(RMSNorm(x)), then x + MLP(RMSNorm(x)).
Training runs the recurrence in parallel over time (see scan.py); `step`/`generate` run it token
by token with O(1) state: one [batch, inner] vector per layer.

Deviations, and why:
* The default training scan is a chunked linear-space scan with a hand-written backward, not
  the log-space (Heinsen) scan: 4-7x faster per training step on CPU and more accurate in
  float32 (scan.py has the numbers). `Config.scan = "log"` selects the paper's log-space scan,
  "sequential" the plain loop; all three are tested to agree.
* minLSTM runs through the minGRU kernel with the effective gate k = logsigmoid(k_i) -
  logsigmoid(k_f) (algebraically identical: sigmoid(k) = i / (f + i)).
* Projections have no bias (as in most recent LMs, and the reference minGRU-pytorch); the cell's
  output projection exists only when `expansion` != 1, also as in that reference. Each gate has
  its own projection matrix (faster elementwise kernels on CPU; same parameters as one matrix).
* No causal depthwise convolution and no dropout: not needed at this scale.
* RMSNorm instead of LayerNorm; GELU MLP; byte vocabulary with tied input/output embeddings
  (`tie_embeddings`).

Shapes: B batch, T time, D model width, E cell width (= round(D * expansion)), V vocabulary,
L layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .scan import (
    log_g,
    log_scan,
    mingru_coefficients,
    mingru_scan,
    mingru_step,
    minlstm_gate,
    sequential_scan,
)

Cell = Literal["mingru", "minlstm"]
Scan = Literal["chunked", "log", "sequential"]


@dataclass
class Config:
    """Hyperparameters of `MinRNNLM` (the job spec's `model:` block minus `family`)."""

    cell: Literal["mingru", "minlstm"] = "mingru"
    """Recurrent cell: the paper's minGRU or minLSTM."""
    vocab_size: int = 256
    """Token vocabulary; 256 for raw bytes."""
    dim: int = 256
    """Model (residual stream) width D."""
    depth: int = 4
    """Number of residual blocks (cell + MLP)."""
    expansion: float = 1.0
    """Cell width E = round(D * expansion); != 1 adds an output projection E -> D."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the byte embedding with the output head."""
    scan: Literal["chunked", "log", "sequential"] = "chunked"
    """How training evaluates the recurrence (all give the same numbers): the fast chunked
    scan, the paper's log-space scan, or a plain loop over time."""
    chunk: int = 0
    """Steps per chunk for the "chunked" and "log" scans; 0 = automatic (~sqrt(T/2), resp. 64)."""
    dropout: float = 0.0
    """Dropout on each residual branch's output (cell and MLP), in training only; not in the
    paper (its LMs use none), here so sweeps (PBT) can regularise."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("expansion", "mlp_ratio", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cell not in ("mingru", "minlstm"):
            raise ValueError(f"cell must be 'mingru' or 'minlstm', got {self.cell!r}")
        if self.scan not in ("chunked", "log", "sequential"):
            raise ValueError(f"scan must be 'chunked', 'log' or 'sequential', got {self.scan!r}")
        if self.chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {self.chunk}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def inner(self) -> int:
        return max(1, round(self.dim * self.expansion))


class MinRNN(nn.Module):
    """One minGRU or minLSTM layer: [B, T, D] -> [B, T, D], with state [B, E]."""

    def __init__(self, dim: int, cell: Cell = "mingru", expansion: float = 1.0,
                 scan: Scan = "chunked", chunk: int = 0):
        super().__init__()
        self.cell, self.scan, self.chunk = cell, scan, chunk
        self.inner = max(1, round(dim * expansion))
        # One projection per gate rather than one fused matrix: the outputs are then contiguous,
        # and elementwise kernels on CPU run 2-3x faster on contiguous inputs than on the
        # strided halves of a fused output (same parameters and FLOPs).
        if cell == "minlstm":
            self.forget_proj = nn.Linear(dim, self.inner, bias=False)
            self.input_proj = nn.Linear(dim, self.inner, bias=False)
        else:
            self.gate_proj = nn.Linear(dim, self.inner, bias=False)
        self.cand_proj = nn.Linear(dim, self.inner, bias=False)
        self.out_proj = (nn.Linear(self.inner, dim, bias=False) if self.inner != dim
                         else nn.Identity())

    def _gate_and_candidate(self, x):
        """(k, u): minGRU's gate and candidate pre-activations (minLSTM's effective gate)."""
        if self.cell == "mingru":
            return self.gate_proj(x), self.cand_proj(x)
        return minlstm_gate(self.forget_proj(x), self.input_proj(x)), self.cand_proj(x)

    def forward(self, x_BTD, h0_BE=None):
        """All T steps in parallel. Returns (y [B, T, D], h_T [B, E])."""
        k, u = self._gate_and_candidate(x_BTD)
        if self.scan == "chunked":
            h = mingru_scan(k, u, h0_BE, self.chunk)
        elif self.scan == "log":
            log_a, log_b = F.logsigmoid(-k), F.logsigmoid(k) + log_g(u)
            h = log_scan(log_a, log_b, h0_BE, self.chunk or 64)
        else:
            h = sequential_scan(*mingru_coefficients(k, u), h0_BE)
        return self.out_proj(h), h[:, -1]

    def step(self, x_BD, h_BE):
        """One time step with O(1) state. Returns (y [B, D], h [B, E])."""
        k, u = self._gate_and_candidate(x_BD)
        h_BE = mingru_step(k, u, h_BE)
        return self.out_proj(h_BE), h_BE


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + Cell(norm(x)), then x + MLP(norm(x)). The FSDP unit."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.rnn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.rnn = MinRNN(cfg.dim, cfg.cell, cfg.expansion, cfg.scan, cfg.chunk)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, max(1, round(cfg.dim * cfg.mlp_ratio)))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, h0_BE=None):
        y, h_BE = self.rnn(self.rnn_norm(x_BTD), h0_BE)
        x_BTD = x_BTD + self.drop(y)
        return x_BTD + self.drop(self.mlp(self.mlp_norm(x_BTD))), h_BE

    def step(self, x_BD, h_BE):
        y, h_BE = self.rnn.step(self.rnn_norm(x_BD), h_BE)
        x_BD = x_BD + y
        return x_BD + self.mlp(self.mlp_norm(x_BD)), h_BE


class MinRNNLM(nn.Module):
    """Byte-level LM. The recurrent state is one tensor [L, B, E] (zeros = empty context)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(cfg.dim))
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_state(self, batch_size: int) -> torch.Tensor:
        """The empty-context state [L, B, E]."""
        w = self.embed.weight
        return w.new_zeros(self.cfg.depth, batch_size, self.cfg.inner)

    def forward(self, tokens_BT: torch.Tensor, state: torch.Tensor | None = None):
        """Logits for every position, all positions in parallel.

        Args:
            tokens_BT: int64 tokens.
            state: [L, B, E] state after the preceding context, or None for an empty context.
        Returns:
            (logits [B, T, V], state after the last token [L, B, E]).
        """
        x = self.embed(tokens_BT)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, h = block(x, None if state is None else state[i])
            new_state.append(h)
        return self.head(self.norm(x)), torch.stack(new_state)

    def step(self, token_B: torch.Tensor, state: torch.Tensor):
        """Feed one token per sequence through the recurrence. Returns (logits [B, V], state)."""
        x = self.embed(token_B)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, h = block.step(x, state[i])
            new_state.append(h)
        return self.head(self.norm(x)), torch.stack(new_state)

    @torch.no_grad()
    def generate(self, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, state: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `prompt_BT` by `max_new_tokens` tokens. Returns [B, T + max_new_tokens].

        The prompt goes through the parallel scan once; every new token costs one `step`, with
        constant memory. temperature 0 is greedy; top_k > 0 samples from the k likeliest bytes.
        """
        if prompt_BT.shape[1] == 0:
            raise ValueError("prompt_BT must hold at least one token")
        logits_BTV, state = self(prompt_BT, state)
        logits_BV = logits_BTV[:, -1]
        out = [prompt_BT]
        for _ in range(max_new_tokens):
            token_B = sample(logits_BV, temperature, top_k, generator)
            out.append(token_B[:, None])
            logits_BV, state = self.step(token_B, state)
        return torch.cat(out, dim=1)


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (temperature 0) or temperature / top-k sampling. Returns int64 [B]."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
