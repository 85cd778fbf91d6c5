"""TokenFormer's growth is function-preserving and trainable (Wang et al., 2024, Sec. 3.5).

Tolerances: in float64 the grown model does the same arithmetic on the old tokens plus exact zeros
(0 * v and GeLU(0) = 0 add nothing), but matmul kernels may block differently for the longer
token dimension, so sums may be reordered: ~1e-15 relative per op, 1e-12 allows for depth. In
float32 the same reordering gives ~1e-7 relative; we allow 1e-6 absolute on logits of size ~1.
A tau that followed the token count (the released code) changes logits by ~1e-2, far outside.
Split growth (`init: split`) replaces each value v by k copies v / k + e_j with sum_j e_j = 0: the
same sum up to rounding of the noise (std 0.15 by default, ~1e-16 relative in float64, ~1e-7 in float32), so
the same tolerances hold.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shipyard_models.tokenformer import Config, GrowArgs, Pattention, TokenFormerLM, grow, grow_state
from shipyard_models.tokenformer.growth import grow_config, grow_optimizer_state

CFG = Config(dim=32, n_layers=2, n_heads=2, qkv_tokens=16, ffn_tokens=32, max_seq_len=16)


def tiny(dtype=torch.float64, seed=0) -> TokenFormerLM:
    torch.manual_seed(seed)
    return TokenFormerLM(CFG).to(dtype)


def tokens(seed=1, B=3, T=12) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x) -> torch.Tensor:
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_logits_are_identical_before_and_after_growth(dtype, atol):
    model, x = tiny(dtype), tokens()
    with torch.no_grad():
        before = model(x)
        grow(model, qkv_tokens=8, ffn_tokens=16)
        after = model(x)
    assert model.blocks[0].ffn.n_tokens == 48 and model.blocks[1].attn.key.n_tokens == 24
    assert (model.cfg.qkv_tokens, model.cfg.ffn_tokens) == (24, 48)
    assert float(model.blocks[0].ffn.tau) == pytest.approx(32 ** 0.5)  # fixed at creation
    torch.testing.assert_close(after, before, rtol=0, atol=atol)


def test_a_tau_that_follows_the_token_count_would_break_growth():
    """The deviation from the released code is needed: with tau = sqrt(current n) the grown
    model's logits move (so the identity test above can fail)."""
    model, x = tiny(), tokens()
    with torch.no_grad():
        before = model(x)
        grow(model, qkv_tokens=8, ffn_tokens=16)
        for m in model.modules():
            if isinstance(m, Pattention):
                m.tau.fill_(m.n_tokens ** 0.5)
        moved = (model(x) - before).abs().max().item()
    assert moved > 1e-3


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_split_growth_is_exact_and_reaches_the_released_tau(dtype, atol):
    """qkv 16 -> 32 (each token split in 2); ffn 32 -> 72 (split in 2, then 8 zero-key tokens)."""
    model, x = tiny(dtype), tokens()
    with torch.no_grad():
        before = model(x)
        grow(model, qkv_tokens=16, ffn_tokens=40, init="split")
        after = model(x)
    assert (model.cfg.qkv_tokens, model.cfg.ffn_tokens) == (32, 72)
    assert float(model.blocks[1].attn.out.tau) == pytest.approx(32 ** 0.5)  # sqrt(n): the released tau
    assert float(model.blocks[0].ffn.tau) == pytest.approx(64 ** 0.5)  # sqrt(2 x 32); 8 tokens appended
    ffn = model.blocks[0].ffn
    assert torch.equal(ffn.key_tokens[0], ffn.key_tokens[1]) and not ffn.key_tokens[64:].any()
    assert not torch.equal(ffn.value_tokens[0], ffn.value_tokens[1])  # the noise
    torch.testing.assert_close(after, before, rtol=0, atol=atol)


@pytest.mark.parametrize("noise", [0.3, 0.0])
def test_split_copies_learn_apart_only_with_noise(noise):
    """Equal copies get equal gradients, so they would stay equal; the zero-sum noise on their
    values makes their key gradients differ from the first backward on."""
    model = grow(tiny(), qkv_tokens=16, ffn_tokens=32, init="split", split_noise=noise)
    lm_loss(model, tokens()).backward()
    for name, p in model.named_parameters():
        if name.endswith("key_tokens"):
            assert p.grad.abs().amax(dim=1).min() > 1e-8, name  # every copy learns
            first, second = p.grad[0::2], p.grad[1::2]
            gap = (first - second).abs().max().item() / first.abs().max().item()
            assert (gap > 1e-3) if noise else (gap < 1e-12), (name, gap)


def test_new_keys_get_gradient_after_one_backward():
    model = grow(tiny(), qkv_tokens=4, ffn_tokens=4, value_std=0.02)
    lm_loss(model, tokens()).backward()
    for name, p in model.named_parameters():
        if name.endswith("key_tokens"):
            new = p.grad[-4:]
            assert new.abs().max() > 1e-8, name  # every grown layer's new keys learn


def test_zero_keys_with_zero_values_get_no_gradient():
    model = grow(tiny(), qkv_tokens=4, ffn_tokens=4, value_std=0.0)
    lm_loss(model, tokens()).backward()
    for name, p in model.named_parameters():
        if name.endswith("_tokens"):
            assert torch.all(p.grad[-4:] == 0), name  # the dead saddle
            assert p.grad[:-4].abs().max() > 0, name  # while the old tokens learn


def _adam(model):
    # No weight decay interplay issue (it is per element too), no clipping: the global gradient
    # norm of the grown model includes the new keys, so clipping would couple old and new rows.
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _train(model, opt, steps, seed=10):
    for s in range(steps):
        opt.zero_grad()
        lm_loss(model, tokens(seed + s)).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["continue", "fresh"])
def test_step_then_grow_equals_grow_then_step_on_the_old_rows(optimizer):
    """Adam continued through growth (moments zero-padded, step count kept) takes exactly the
    small model's next step on the old rows; a fresh Adam does not (bias correction restarts)."""
    model = tiny()
    opt = _adam(model)
    _train(model, opt, 3)
    a, b = model, copy.deepcopy(model)
    opt_b = _adam(b)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors

    _train(a, opt, 1, seed=50)  # step, then grow
    grow(a, qkv_tokens=4, ffn_tokens=8)
    if optimizer == "continue":  # grow, then step
        grow(b, qkv_tokens=4, ffn_tokens=8, optimizer=opt_b)
    else:
        grow(b, qkv_tokens=4, ffn_tokens=8)
        opt_b = _adam(b)
    _train(b, opt_b, 1, seed=50)

    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    worst = 0.0
    for name in pa:
        rows = pa[name].shape[0] - (8 if name.endswith("ffn.key_tokens") or name.endswith("ffn.value_tokens")
                                    else 4 if name.endswith("_tokens") else 0)
        worst = max(worst, (pa[name][:rows] - pb[name][:rows]).abs().max().item())
    if optimizer == "continue":
        assert worst < 1e-12  # float64; the same elementwise Adam arithmetic on equal inputs
        assert opt_b.state[pb["blocks.0.ffn.key_tokens"]]["step"] == 4
    else:
        assert worst > 1e-4  # lr 1e-2: a restarted Adam moves the old rows differently


def test_split_without_noise_then_adam_takes_the_small_models_step():
    """Split growth stores a copy's value as the old value under value_scale / k, so its gradient
    and Adam moments are 1/k of the old token's and Adam (scale-free) moves the k copies together
    by one old step: with equal copies (no noise) "grow then step" computes what "step then grow"
    does. Stored as value / k at scale 1, each copy would move a whole step and the layer k steps.
    eps is tiny so that Adam is scale-free to rounding (eps against sqrt(v) / k otherwise)."""
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.1)
    _train(model, opt, 3)
    a, b = model, copy.deepcopy(model)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(a, opt, 1, seed=50)  # step, then grow
    grow(a, qkv_tokens=16, ffn_tokens=32, init="split", split_noise=0.0)
    grow(b, qkv_tokens=16, ffn_tokens=32, init="split", split_noise=0.0, optimizer=opt_b)  # grow, then step
    _train(b, opt_b, 1, seed=50)
    assert float(b.blocks[0].ffn.value_scale) == 0.5
    pb = dict(b.named_parameters())
    worst = max((p - pb[name]).abs().max().item() for name, p in a.named_parameters())
    assert worst < 1e-12, worst
    with torch.no_grad():
        torch.testing.assert_close(b(tokens()), a(tokens()), rtol=0, atol=1e-12)


def test_growing_twice_compounds_value_scale_and_stays_exact():
    model, x = tiny(), tokens()
    with torch.no_grad():
        before = model(x)
        grow(model, qkv_tokens=16, ffn_tokens=32, init="split", seed=1)
        grow(model, qkv_tokens=32, ffn_tokens=64, init="split", seed=2)
        grow(model, qkv_tokens=8, ffn_tokens=8, init="zero", seed=3)  # appended values / value_scale
        after = model(x)
    assert float(model.blocks[1].attn.query.value_scale) == 0.25
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    new_values = model.blocks[1].attn.query.value_tokens[-8:] * 0.25
    assert 0.01 < new_values.std().item() < 0.04  # value_std 0.02 as the layer computes it


def test_a_state_dict_from_before_value_scale_loads_and_grows():
    """Checkpoints written before the buffer existed have no `value_scale`: they load with 1."""
    model = tiny()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("value_scale")}
    fresh = TokenFormerLM(CFG).double()
    fresh.load_state_dict(old, strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    args = GrowArgs(qkv_tokens=16, ffn_tokens=32, init="split")
    grown = grow_state(old, args)
    assert float(grown["blocks.0.ffn.value_scale"]) == 0.5
    big = TokenFormerLM(grow_config(CFG, args)).double()
    big.load_state_dict(grown, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(big(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("init,qkv,ffn", [("zero", 4, 8), ("split", 16, 40)])
def test_state_dict_and_optimizer_growth_match_in_place_growth(init, qkv, ffn):
    model, opt = tiny(), None
    opt = _adam(model)
    _train(model, opt, 2)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    optim_sd = get_optimizer_state_dict(model, opt)
    args = GrowArgs(qkv_tokens=qkv, ffn_tokens=ffn, seed=3, init=init)
    grown_sd = grow_state(model.state_dict(), args)
    grown_optim = grow_optimizer_state(optim_sd, args)
    grow(model, qkv, ffn, seed=3, init=init, optimizer=opt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(grown_sd[k], v, rtol=0, atol=0)
    live = get_optimizer_state_dict(model, opt)
    for fqn, st in live["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(grown_optim["state"][fqn][k], v, rtol=0, atol=0)
    new = TokenFormerLM(model.cfg).double()
    new.load_state_dict(grown_sd, strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=0, atol=0)


def test_bad_growth_arguments_name_the_field():
    with pytest.raises(ValueError, match="qkv_tokens must be 0 or more"):
        GrowArgs(qkv_tokens=-1, ffn_tokens=4)
    with pytest.raises(ValueError, match="nothing to grow"):
        GrowArgs()
    with pytest.raises(ValueError, match="value_std"):
        GrowArgs(qkv_tokens=1, value_std=-1.0)
    with pytest.raises(ValueError, match="init must be one of zero, split, got 'copy'"):
        GrowArgs(qkv_tokens=1, init="copy")
    with pytest.raises(ValueError, match="split_noise must be 0 or more"):
        GrowArgs(qkv_tokens=1, split_noise=-0.1)
    with pytest.raises(TypeError, match="split_nois"):  # grow() takes GrowArgs' fields, no others
        grow(tiny(), qkv_tokens=4, ffn_tokens=4, split_nois=0.1)
    with pytest.raises(ValueError, match="init must be one of"):  # and checks them as GrowArgs does
        grow(tiny(), qkv_tokens=4, ffn_tokens=4, init="copy")
