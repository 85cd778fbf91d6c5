"""Progressive model growth (TokenFormer, Wang et al., 2024, arXiv:2410.23168, Sec. 3.5):
append parameter tokens to every Pattention layer and keep training.

New key tokens are zero and new value tokens small random numbers. A zero key scores 0 against
every input, GeLU(0) = 0, and the layer's tau is fixed (model.py), so the grown model computes
exactly what the small one did. The gradient reaching a new key is GeLU'(0) * tau / ||A_i|| *
x (dL/dO . v_new), non-zero as soon as the new value is; zero keys with zero values are a saddle
that no gradient leaves (`value_std=0` shows it).

Optimizer continuation: Adam's moments of the grown tensors are padded with zero rows and the step
count is kept, so the old rows' next update is exactly the small model's next update ("step then
grow" equals "grow then step"). `optimizer: fresh` in a stage spec restarts Adam instead (what the
released code does).

Three views of the same operation, which agree exactly for the same `GrowArgs`:
* `grow(model, qkv_tokens=m, ffn_tokens=m, optimizer=opt)`: in place, on a live model (and optimizer);
* `grow_state(state, args)`: on a model state dict (checkpoint conversion);
* `grow_optimizer_state(optim_state, args)`: on a fully-qualified-name keyed optimizer state
  (torch.distributed.checkpoint.state_dict's format).
New value rows come from a generator seeded by (args.seed, parameter name), so every process and
every view draws the same numbers.

Deviation: the paper (and the released code) recompute tau from the grown token count; see
model.py for why we keep it fixed.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .model import Config, Pattention

KEY, VALUE = "key_tokens", "value_tokens"
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


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
    """Seed of the new value tokens."""

    def __post_init__(self) -> None:
        for name in ("qkv_tokens", "ffn_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.qkv_tokens == 0 and self.ffn_tokens == 0:
            raise ValueError("qkv_tokens and ffn_tokens are both 0: nothing to grow")
        if self.value_std < 0:
            raise ValueError(f"value_std must be 0 or more, got {self.value_std}")


def grow_config(cfg: Config, args: GrowArgs) -> Config:
    """The config of the grown model."""
    return dataclasses.replace(cfg, qkv_tokens=cfg.qkv_tokens + args.qkv_tokens,
                               ffn_tokens=cfg.ffn_tokens + args.ffn_tokens)


def added_tokens(name: str, args: GrowArgs) -> int:
    """Tokens added to the Pattention layer whose parameter is `name` (by its module path)."""
    return args.ffn_tokens if name.split(".")[-2] == "ffn" else args.qkv_tokens


def new_rows(name: str, old: torch.Tensor, args: GrowArgs) -> torch.Tensor:
    """The rows appended to parameter `name`: zeros for keys, N(0, value_std^2) for values."""
    m = added_tokens(name, args)
    if name.endswith(KEY) or args.value_std == 0:
        return old.new_zeros(m, old.shape[1])
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + zlib.crc32(name.encode()))
    rows = torch.randn(m, old.shape[1], generator=gen, dtype=torch.float64) * args.value_std
    return rows.to(device=old.device, dtype=old.dtype)


def is_token_parameter(name: str) -> bool:
    return name.endswith("." + KEY) or name.endswith("." + VALUE)


def grow_state(state: dict[str, torch.Tensor], args: GrowArgs) -> dict[str, torch.Tensor]:
    """A model state dict with every Pattention layer's tokens grown (tau buffers unchanged)."""
    return {name: torch.cat([t, new_rows(name, t, args)]) if is_token_parameter(name) else t
            for name, t in state.items()}


def grow_optimizer_state(optim_state: dict, args: GrowArgs) -> dict:
    """An FQN-keyed optimizer state ({"state": {fqn: {...}}, "param_groups": [...]}) with Adam's
    moments of the grown parameters padded by zero rows; the step count is kept."""
    state = {}
    for name, per_param in optim_state["state"].items():
        if is_token_parameter(name):
            per_param = {k: _pad(v, added_tokens(name, args)) if k in MOMENTS else v
                         for k, v in per_param.items()}
        state[name] = per_param
    return {"state": state, "param_groups": optim_state["param_groups"]}


def _pad(moment: torch.Tensor, m: int) -> torch.Tensor:
    return torch.cat([moment, moment.new_zeros(m, *moment.shape[1:])])


def grow(model: nn.Module, qkv_tokens: int = 0, ffn_tokens: int = 0, *, value_std: float = 0.02,
         seed: int = 0, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Grow a (plain, unwrapped) TokenFormerLM in place; returns it with its `cfg` updated.

    With `optimizer` (Adam/AdamW holding the model's parameters), the grown parameters replace the
    old ones in it, their moments padded with zeros and their step count kept.
    """
    args = GrowArgs(qkv_tokens=qkv_tokens, ffn_tokens=ffn_tokens, value_std=value_std, seed=seed)
    for path, module in model.named_modules():
        if not isinstance(module, Pattention):
            continue
        for attr in (KEY, VALUE):
            name = f"{path}.{attr}"
            old = getattr(module, attr)
            new = nn.Parameter(torch.cat([old.detach(), new_rows(name, old.detach(), args)]),
                               requires_grad=old.requires_grad)
            setattr(module, attr, new)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, old, new, added_tokens(name, args))
    model.cfg = grow_config(model.cfg, args)
    return model


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                       m: int) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {k: _pad(v, m) if k in MOMENTS else v for k, v in state.items()}
