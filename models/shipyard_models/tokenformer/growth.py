"""Progressive model growth (TokenFormer, Wang et al., 2024, arXiv:2410.23168, Sec. 3.5):
add parameter tokens to every Pattention layer and keep training. Two ways, both exact (the grown
model computes what the small one did):

`init: zero` (the default; the paper's recipe). New key tokens are zero and new value tokens
small random numbers. A zero key scores 0 against every input, GeLU(0) = 0, and the layer's tau
is fixed (model.py), so the output does not move. The gradient reaching a new key is GeLU'(0) *
tau / ||A_i|| * x (dL/dO . v_new), non-zero as soon as the new value is; zero keys with zero
values are a saddle that no gradient leaves (`value_std=0` shows it). Once the new keys grow,
the row norm ||A_i|| spreads over n + m tokens while tau stays sqrt(n): the normalised scores
shrink by up to sqrt(n / (n + m)) and GeLU works in its near-linear range (measured: mean |score|
0.14-0.21 after x8 growth, against ~0.8 in a model trained at either size).

`init: split` (ours, not in the paper). Every old token becomes k = (n + m) // n copies with the
old key and value / k, tau is multiplied by sqrt(k), and any remaining m - (k - 1) n tokens are
appended as in `zero`. The layer's `value_scale` is divided by k and the stored values multiplied
by k (model.py), so a copy's stored value is the old token's: Adam steps every parameter by about
the learning rate whatever its size, and a copy stored as value / k would move k times faster
relative to its size -- the k copies, scoring alike, would together move the output k times as far
as the old token did. Without noise, that alone took the loss from 1.60 to 1.90 within 60 steps of
growth x16; with the scale, noise-free copies stay at the small model's level, and the jump left is
what the noise below costs (benchmarks/tokenformer_growth_probe.py, README). Each copy scores the
same as the old token, the row norm grows by sqrt(k) and tau with it, so every normalised score --
and the sum of the k copies' contributions -- is unchanged. When the old tau was sqrt(n) and m a
multiple of n, the new tau is sqrt(n + m): the released code's tau, with growth still exact. Copies
that stayed equal would get equal gradients forever; a noise of std `split_noise` that sums to zero
over each token's copies is added to their values, which breaks the tie without moving the output.
Measured in benchmarks/tokenformer_growth.py (README): split growth ends well below zero-key
growth.

Optimizer continuation: Adam's moments of the grown tensors are padded with zero rows and the step
count is kept, so with `init: zero` the old rows' next update is exactly the small model's next
update ("step then grow" equals "grow then step"). With `init: split` each copy inherits its
token's moments divided by k (first moment) and k^2 (second): a key copy's gradient is about 1/k of
the old key's (its value is value / k), a value copy's exactly 1/k of the old value's (through
value_scale / k). `optimizer: fresh` in a stage spec restarts Adam instead (what the released code
does).

Three views of the same operation, which agree exactly for the same `GrowArgs`:
* `grow(model, qkv_tokens=m, ffn_tokens=m, optimizer=opt)`: in place, on a live model (and optimizer);
* `grow_state(state, args)`: on a model state dict (checkpoint conversion);
* `grow_optimizer_state(optim_state, args)`: on a fully-qualified-name keyed optimizer state
  (torch.distributed.checkpoint.state_dict's format).
New value rows come from a generator seeded by (args.seed, parameter name), so every process and
every view draws the same numbers.

Deviation: the paper (and the released code) recompute tau from the grown token count; see
model.py for why we keep it fixed (`split` reaches that tau exactly where it can).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .model import Config, Pattention

KEY, VALUE = "key_tokens", "value_tokens"
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
MOMENT_POWER = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
"""How a moment scales with its gradient (a split copy's gradient is ~1/k of the old token's)."""
INITS = ("zero", "split")


@dataclass
class GrowArgs:
    """How much to grow (a stage's `args:` block for the `grow` transform)."""

    qkv_tokens: int = 0
    """Parameter tokens added to each query, key, value and output Pattention layer."""
    ffn_tokens: int = 0
    """Parameter tokens added to each feed-forward Pattention layer."""
    value_std: float = 0.02
    """Standard deviation of the new value tokens (0 makes the new tokens a dead saddle)."""
    seed: int = 0
    """Seed of the new value tokens (and of the split noise)."""
    init: str = "zero"
    """`zero`: append zero keys and small random values. `split`: split every token into
    (n + m) // n copies, tau times sqrt of that (see the module docstring)."""
    split_noise: float = 0.1
    """With `init: split`: std of the zero-sum noise added to the copies' values (0 leaves the
    copies equal, and equal they stay). 0.1-0.15 came out best growing x16 (0.01-0.6 probed, with
    and without value_scale; 0.2-0.3 at x8: README); the noise is large against a copy's
    value / k, which it is meant to be."""

    def __post_init__(self) -> None:
        for name in ("qkv_tokens", "ffn_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.qkv_tokens == 0 and self.ffn_tokens == 0:
            raise ValueError("qkv_tokens and ffn_tokens are both 0: nothing to grow")
        if self.value_std < 0:
            raise ValueError(f"value_std must be 0 or more, got {self.value_std}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.split_noise < 0:
            raise ValueError(f"split_noise must be 0 or more, got {self.split_noise}")


def grow_config(cfg: Config, args: GrowArgs) -> Config:
    """The config of the grown model."""
    return dataclasses.replace(cfg, qkv_tokens=cfg.qkv_tokens + args.qkv_tokens,
                               ffn_tokens=cfg.ffn_tokens + args.ffn_tokens)


def added_tokens(name: str, args: GrowArgs) -> int:
    """Tokens added to the Pattention layer whose parameter (or tau) is `name` (by module path)."""
    return args.ffn_tokens if name.split(".")[-2] == "ffn" else args.qkv_tokens


def copies(n_old: int, m: int, args: GrowArgs) -> int:
    """k: how many tokens each old token becomes (1 unless `init: split` and m >= n_old)."""
    return (n_old + m) // n_old if args.init == "split" else 1


def _generator(args: GrowArgs, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed * 1_000_003 + zlib.crc32(name.encode()))


def new_rows(name: str, old: torch.Tensor, args: GrowArgs, m: int | None = None) -> torch.Tensor:
    """`m` rows (default: all the added tokens) appended to parameter `name`: zeros for keys,
    N(0, value_std^2) for values."""
    m = added_tokens(name, args) if m is None else m
    if name.endswith(KEY) or args.value_std == 0:
        return old.new_zeros(m, old.shape[1])
    rows = torch.randn(m, old.shape[1], generator=_generator(args, name), dtype=torch.float64)
    return (rows * args.value_std).to(device=old.device, dtype=old.dtype)


def grown_parameter(name: str, old: torch.Tensor, args: GrowArgs, value_scale: float = 1.0) -> torch.Tensor:
    """The grown key or value tokens of parameter `name` (stored values, whose layer's
    `value_scale` was `value_scale`): the old rows (split into k copies under `init: split`), then
    the appended rows."""
    n, m = old.shape[0], added_tokens(name, args)
    k = copies(n, m, args)
    new_scale = value_scale / k
    appended = new_rows(name, old, args, m - (k - 1) * n)
    if name.endswith(KEY):
        return torch.cat([old.repeat_interleave(k, dim=0), appended])
    if k > 1:  # value / k per copy, plus noise summing to zero over each token's copies, stored / new_scale
        noise = torch.randn(n, k, old.shape[1], generator=_generator(args, name + "/split"),
                            dtype=torch.float64) * args.split_noise
        noise = (noise - noise.mean(dim=1, keepdim=True)).to(device=old.device, dtype=old.dtype)
        old = (old[:, None, :] + noise / new_scale).reshape(n * k, old.shape[1])
    return torch.cat([old, appended / new_scale])


def grown_moment(name: str, kind: str, moment: torch.Tensor, args: GrowArgs) -> torch.Tensor:
    """Adam's moment `kind` of parameter `name`, grown as `grown_parameter` grows the parameter."""
    n, m = moment.shape[0], added_tokens(name, args)
    k = copies(n, m, args)
    split = moment.repeat_interleave(k, dim=0) / k ** MOMENT_POWER[kind]
    return _pad(split, m - (k - 1) * n)


def grown_tau(name: str, tau: torch.Tensor, n_old: int, args: GrowArgs) -> torch.Tensor:
    """Layer `name`'s tau after growth: unchanged, or times sqrt(k) under `init: split`."""
    k = copies(n_old, added_tokens(name, args), args)
    return tau if k == 1 else tau * math.sqrt(k)


def grown_value_scale(name: str, scale: torch.Tensor, n_old: int, args: GrowArgs) -> torch.Tensor:
    """Layer `name`'s value_scale after growth: unchanged, or divided by k under `init: split`."""
    k = copies(n_old, added_tokens(name, args), args)
    return scale if k == 1 else scale / k


def is_token_parameter(name: str) -> bool:
    return name.endswith("." + KEY) or name.endswith("." + VALUE)


def grow_state(state: dict[str, torch.Tensor], args: GrowArgs) -> dict[str, torch.Tensor]:
    """A model state dict with every Pattention layer's tokens (and, for `split`, tau and
    value_scale) grown. A layer without `value_scale` (a checkpoint from before it) had 1."""
    out = {}
    for name, t in state.items():
        if is_token_parameter(name):
            layer = name.rsplit(".", 1)[0]
            scale = state.get(layer + ".value_scale", torch.tensor(1.0))
            out[name] = grown_parameter(name, t, args, float(scale))
            if name.endswith(KEY):
                out[layer + ".value_scale"] = grown_value_scale(layer + ".value_scale", scale, t.shape[0], args)
        elif name.endswith(".tau") and name[:-len("tau")] + KEY in state:
            out[name] = grown_tau(name, t, state[name[:-len("tau")] + KEY].shape[0], args)
        elif not (name.endswith(".value_scale") and name[:-len("value_scale")] + KEY in state):
            out[name] = t
    return out


def grow_optimizer_state(optim_state: dict, args: GrowArgs) -> dict:
    """An FQN-keyed optimizer state ({"state": {fqn: {...}}, "param_groups": [...]}) with Adam's
    moments of the grown parameters grown alike (zero rows for appended tokens); the step count
    is kept."""
    state = {}
    for name, per_param in optim_state["state"].items():
        if is_token_parameter(name):
            per_param = {k: grown_moment(name, k, v, args) if k in MOMENTS else v
                         for k, v in per_param.items()}
        state[name] = per_param
    return {"state": state, "param_groups": optim_state["param_groups"]}


def _pad(moment: torch.Tensor, m: int) -> torch.Tensor:
    return torch.cat([moment, moment.new_zeros(m, *moment.shape[1:])])


def grow(model: nn.Module, qkv_tokens: int = 0, ffn_tokens: int = 0, *,
         optimizer: torch.optim.Optimizer | None = None, **options) -> nn.Module:
    """Grow a (plain, unwrapped) TokenFormerLM in place; returns it with its `cfg` updated.

    `options` are GrowArgs' other fields (value_std, seed, init, split_noise), with its defaults.
    With `optimizer` (Adam/AdamW holding the model's parameters), the grown parameters replace the
    old ones in it, their moments grown alike (`grown_moment`) and their step count kept.
    """
    args = GrowArgs(qkv_tokens=qkv_tokens, ffn_tokens=ffn_tokens, **options)
    for path, module in model.named_modules():
        if not isinstance(module, Pattention):
            continue
        n_old, scale = module.n_tokens, float(module.value_scale)
        for attr in (KEY, VALUE):
            name = f"{path}.{attr}"
            old = getattr(module, attr)
            new = nn.Parameter(grown_parameter(name, old.detach(), args, scale), requires_grad=old.requires_grad)
            setattr(module, attr, new)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, name, old, new, args)
        module.tau.copy_(grown_tau(f"{path}.tau", module.tau, n_old, args))
        module.value_scale.copy_(grown_value_scale(f"{path}.value_scale", module.value_scale, n_old, args))
    model.cfg = grow_config(model.cfg, args)
    return model


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, name: str, old: nn.Parameter,
                       new: nn.Parameter, args: GrowArgs) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {k: grown_moment(name, k, v, args) if k in MOMENTS else v
                                for k, v in state.items()}
