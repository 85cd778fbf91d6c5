"""Scans for the minimal RNNs of "Were RNNs All We Needed?" (Feng et al., 2024, arXiv:2410.01201).

Both cells reduce to the first-order linear recurrence

    h_t = a_t * h_{t-1} + b_t,    0 < a_t < 1,

with a_t = 1 - z_t = sigmoid(-k_t), b_t = z_t * g(u_t) for minGRU (k: gate pre-activation,
u: candidate pre-activation, g(x) = x + 0.5 for x >= 0 else sigmoid(x)). minLSTM is the same
recurrence with the effective gate k = logsigmoid(k_i) - logsigmoid(k_f), because the paper's
normalised gates are f' = f / (f + i) = sigmoid(-k) and i' = i / (f + i) = sigmoid(k).

Three ways to run it, which the tests hold equal:

* `sequential_scan` - the recurrence itself, one step per time index (reference; generation).
* `log_scan` - the paper's log-space parallel scan (Appendix B, after Heinsen 2023,
  "Efficient parallelization of a ubiquitous sequential computation"):
  h = exp(a* + logcumsumexp(log b - a*)) with a* = cumsum(log a). It needs b > 0, which g
  guarantees. It is optionally chunked, restarting a* at each chunk boundary, because in
  float32 `a* + logcumsumexp(...)` cancels two numbers of size |a*|, losing |a*| * 6e-8 of
  relative precision: with saturated gates |a*| grows by ~12 per step.
* `mingru_scan` - the fast path used for training (default). A `torch.autograd.Function`
  that fuses gates -> recurrence -> output with a hand-derived backward, and evaluates the
  recurrence as a two-level (chunked) scan in linear space: the time axis is cut into n chunks
  of C steps; (1) every chunk runs the recurrence from a zero state, all chunks at once, giving
  its end value and its total decay prod(a); (2) a scan over the n chunk ends carries the true
  start state into every chunk; (3) every chunk reruns from its true start, all chunks at once.
  That is 2C + n vectorised steps (C ~ sqrt(T/2)) instead of T, and O(T) work.
  The backward's reverse recurrence g_t = dh_t + a_{t+1} g_{t+1} is the same scan run
  backwards, so signed values need no special treatment. Fewer, larger kernels matter more on
  CPU than the scan itself: see `_MinGRUScan` for what is saved and what is recomputed.

Deviation from the paper, and why: training does not use the log-space scan by default.
On 2 CPU cores (B=8, D=128, T=2048) `torch.logcumsumexp` alone costs ~29 ms forward while the
whole chunked scan costs ~3-4 ms; per training step of one layer, forward + backward, the fused
chunked path is 4-7x faster than `log_scan` and 3.8-5.2x faster than minGRU-pytorch's log-space
layer (benchmarks/minrnn_scan.py). It is also more accurate: the linear-space form never
exponentiates a positive number, so it cannot overflow, and never divides by a cumulative
product (the naive h_t = A_t * cumsum(b / A)_t, A = cumprod(a), divides by an A that underflows
to 0 after a handful of saturated steps): coefficients only multiply, and a product that
underflows to 0 is the correct value. Its float32 error is that of the sequential loop (one
fused multiply-add per step): 2e-7 relative with gates saturated at |k| ~ 12 over T=2048, where
the unchunked log-space scan loses 6e-4 (tests/models/minrnn/test_minrnn_scan.py). `log_scan`
stays available (`Config.scan = "log"`) and is tested to agree.

Non-zero initial state h0 of any sign: the recurrence is linear in h0, so
h_t = (prod_{s<=t} a_s) * h0 + h_t|_{h0=0}, i.e.
h_t = exp(cumsum(log a))_t * h0 + scan-with-zero-h0.
`log_scan` computes it in exactly that form (the log-space part only ever sees the positive
zero-h0 scan). The chunked scan applies the same decomposition at every chunk boundary: step
(2) computes start_j = prod(a over chunk j-1) * start_{j-1} + (chunk j-1 run from zero), with
start_0 = h0, so h0 is simply the first carried state.

Shapes: B batch, T time, D channels; `_NCBD` is a [B, T, D] tensor viewed (no copy) as
n chunks of C steps, time-major.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation for the candidate state (Appendix B.3)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log(g(x)), computed without forming g(x) on the sigmoid branch."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def mingru_coefficients(k_BTD: torch.Tensor, u_BTD: torch.Tensor):
    """(a, b) of the recurrence from the gate and candidate pre-activations.

    a = sigmoid(-k) rather than 1 - sigmoid(k): the latter loses all relative precision of a
    when the gate saturates open (k ~ +12 gives a ~ 6e-6).
    """
    return torch.sigmoid(-k_BTD), torch.sigmoid(k_BTD) * g(u_BTD)


# ---------------------------------------------------------------------------------------------
# Reference scans (autograd through plain torch ops)


def sequential_scan(a_BTD, b_BTD, h0_BD=None):
    """h_t = a_t * h_{t-1} + b_t, one time step at a time. The reference for everything else."""
    h_BD = torch.zeros_like(b_BTD[:, 0]) if h0_BD is None else h0_BD
    outs = []
    for t in range(b_BTD.shape[1]):
        h_BD = a_BTD[:, t] * h_BD + b_BTD[:, t]
        outs.append(h_BD)
    return torch.stack(outs, dim=1)


def log_scan(log_a_BTD, log_b_BTD, h0_BD=None, chunk: int = 0):
    """The paper's log-space parallel scan (Heinsen), with a signed h0 added by linearity.

    `chunk` > 0 restarts the cumulative sum every `chunk` steps and carries the state across
    boundaries as an initial state, which bounds |a*| and so the float32 cancellation error.
    """
    T = log_b_BTD.shape[1]
    step = T if chunk <= 0 else chunk
    h_BD = h0_BD
    pieces = []
    for start in range(0, T, step):
        la = log_a_BTD[:, start:start + step]
        lb = log_b_BTD[:, start:start + step]
        a_star = torch.cumsum(la, dim=1)
        h = torch.exp(a_star + torch.logcumsumexp(lb - a_star, dim=1))
        if h_BD is not None:
            h = h + torch.exp(a_star) * h_BD.unsqueeze(1)
        pieces.append(h)
        h_BD = h[:, -1]
    return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------------------------
# The fast path


def default_chunk(T: int) -> int:
    """C minimising the 2C + T/C vectorised steps of the chunked scan."""
    return max(1, round(math.sqrt(T / 2)))


def _chunked_recurrence_(a_NCBD, b_NCBD, out_NCBD, h0_BD, reverse: bool) -> None:
    """Fill out with h_t = a_t * h_{t-1} + b_t (reverse: h_t = a_t * h_{t+1} + b_t), h_{-1} = h0.

    Time index t = chunk * C + step. Pure computation, no autograd. `out` may not alias a or b.
    """
    n, C = a_NCBD.shape[:2]
    steps = range(C - 1, -1, -1) if reverse else range(C)
    starts = torch.empty_like(b_NCBD[:, 0])  # the state entering each chunk
    starts[n - 1 if reverse else 0] = h0_BD
    if n > 1:
        # (1) every chunk but the one that no other chunk depends on, from a zero state
        inner = slice(1, n) if reverse else slice(0, n - 1)
        a_in, b_in = a_NCBD[inner], b_NCBD[inner]
        it = iter(steps)
        end_KBD = b_in[:, next(it)].clone()
        for c in it:
            torch.addcmul(b_in[:, c], end_KBD, a_in[:, c], out=end_KBD)
        decay_KBD = a_in.prod(dim=1)
        # (2) carry the true state across chunk boundaries
        order = range(n - 2, -1, -1) if reverse else range(1, n)
        for j in order:
            src = j + 1 if reverse else j - 1  # the chunk feeding j
            k = src - 1 if reverse else src  # its row in end/decay
            torch.addcmul(end_KBD[k], decay_KBD[k], starts[src], out=starts[j])
    # (3) rerun every chunk from its true start
    prev = starts
    for c in steps:
        torch.addcmul(b_NCBD[:, c], a_NCBD[:, c], prev, out=out_NCBD[:, c])
        prev = out_NCBD[:, c]


def _linear_recurrence_(a_BTD, b_BTD, out_BTD, h0_BD, chunk: int, reverse: bool) -> None:
    """Fill out with h_t = a_t * h_{t-1} + b_t from h0 (reverse: h_t = a_t * h_{t+1} + b_t).

    Works on strided [B, T, D] views, so no copies or padding: the n * C steps nearest to h0 go
    through the chunked scan (as [n, C, B, D] views), the remaining T mod C one by one.
    """
    T = b_BTD.shape[1]
    C = min(chunk, T)
    n = T // C
    main = slice(T - n * C, T) if reverse else slice(0, n * C)

    def chunks(x_BTD):
        return x_BTD[:, main].unflatten(1, (n, C)).permute(1, 2, 0, 3)

    _chunked_recurrence_(chunks(a_BTD), chunks(b_BTD), chunks(out_BTD), h0_BD, reverse)
    rest = range(main.start - 1, -1, -1) if reverse else range(main.stop, T)
    prev = out_BTD[:, main.start if reverse else main.stop - 1]
    for t in rest:
        torch.addcmul(b_BTD[:, t], a_BTD[:, t], prev, out=out_BTD[:, t])
        prev = out_BTD[:, t]


class _MinGRUScan(torch.autograd.Function):
    """h = chunked scan of (a, b) = mingru_coefficients(k, u) from h0, with a hand-written backward.

    Saved for backward: z, a, g(u), the indicator u >= 0, and h; k, u and b are not kept.
    Everything stays batch-major (the scan works on strided views), and `torch.where` is
    avoided: on CPU it costs ~10 times an add.
    """

    @staticmethod
    def forward(ctx, k_BTD, u_BTD, h0_BD, chunk: int):
        C = chunk if chunk > 0 else default_chunk(k_BTD.shape[1])
        z_BTD = torch.sigmoid(k_BTD)
        a_BTD = torch.sigmoid(-k_BTD)
        # g(u) = max(u + 0.5, sigmoid(u)): equal to the two-branch definition (sigmoid lies
        # above its tangent 0.5 + u/4 for u < 0 and below it for u > 0)
        g_BTD = torch.maximum(u_BTD + 0.5, torch.sigmoid(u_BTD))
        right_BTD = torch.ge(u_BTD, 0, out=torch.empty_like(g_BTD))  # where g' = 1
        h_BTD = torch.empty_like(g_BTD)
        _linear_recurrence_(a_BTD, z_BTD * g_BTD, h_BTD, h0_BD, C, reverse=False)
        ctx.save_for_backward(z_BTD, a_BTD, g_BTD, right_BTD, h_BTD, h0_BD)
        ctx.chunk = C
        return h_BTD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh_BTD):
        z_BTD, a_BTD, g_BTD, right_BTD, h_BTD, h0_BD = ctx.saved_tensors
        # reverse recurrence gh_t = dh_t + a_{t+1} gh_{t+1}, gh_{T-1} = dh_{T-1}
        gh_BTD = torch.empty_like(h_BTD)
        gh_BTD[:, -1] = dh_BTD[:, -1]
        if h_BTD.shape[1] > 1:
            _linear_recurrence_(a_BTD[:, 1:], dh_BTD[:, :-1], gh_BTD[:, :-1], gh_BTD[:, -1],
                                ctx.chunk, reverse=True)
        # h_t = a_t h_{t-1} + z_t g(u_t):  dh_t/dz_t = g(u_t) - h_{t-1},  dz/dk = z a,
        # dh_t/du_t = z_t g'(u_t), g'(u) = 1 for u >= 0, else sigmoid'(u) = g (1 - g) < 1
        q_BTD = z_BTD * gh_BTD
        dk_BTD = torch.empty_like(q_BTD)
        torch.sub(g_BTD[:, 1:], h_BTD[:, :-1], out=dk_BTD[:, 1:])
        torch.sub(g_BTD[:, 0], h0_BD, out=dk_BTD[:, 0])
        dk_BTD.mul_(a_BTD).mul_(q_BTD)
        g_grad_BTD = torch.addcmul(g_BTD, g_BTD, g_BTD, value=-1)
        du_BTD = torch.maximum(g_grad_BTD, right_BTD, out=g_grad_BTD).mul_(q_BTD)
        dh0_BD = gh_BTD[:, 0] * a_BTD[:, 0]
        return dk_BTD, du_BTD, dh0_BD, None


def mingru_scan(k_BTD, u_BTD, h0_BD=None, chunk: int = 0):
    """Hidden states [B, T, D] of minGRU from gate k and candidate u pre-activations (fast path).

    Args:
        k_BTD: gate pre-activations, z = sigmoid(k).
        u_BTD: candidate pre-activations, h~ = g(u).
        h0_BD: initial state (any sign), zeros when None.
        chunk: steps per chunk of the two-level scan; 0 picks ~sqrt(T/2).

    Half-precision inputs (e.g. under autocast) are scanned in float32 and cast back: a long
    product of bfloat16 coefficients loses too much.
    """
    dtype = k_BTD.dtype
    if dtype in (torch.float16, torch.bfloat16):
        k_BTD, u_BTD = k_BTD.float(), u_BTD.float()
    if h0_BD is None:
        h0_BD = k_BTD.new_zeros(k_BTD.shape[0], k_BTD.shape[2])
    return _MinGRUScan.apply(k_BTD, u_BTD, h0_BD.to(k_BTD.dtype), chunk).to(dtype)


def mingru_step(k_BD, u_BD, h_BD):
    """One step of the recurrence with O(1) state, h = (1 - z) h + z g(u), computed as
    sigmoid(-k) h + sigmoid(k) g(u) like every step of the scans."""
    return torch.addcmul(torch.sigmoid(k_BD) * g(u_BD), torch.sigmoid(-k_BD), h_BD)


def minlstm_gate(k_forget, k_input):
    """The minGRU-style gate of minLSTM: sigmoid(k) = i / (f + i), sigmoid(-k) = f / (f + i)."""
    return F.logsigmoid(k_input) - F.logsigmoid(k_forget)
