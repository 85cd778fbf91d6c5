"""The decoder's properties: HF parameter names, layer ranges and exits, the KV cache, per-sample
layer dropout (including empty batches) and config validation."""
import dataclasses

import pytest
import torch

from shipyard_models.layerskip import FAMILY, Config, KVCache, LayerSkipLM, build
from shipyard_models.layerskip.hf import expected_keys

SMALL = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=48,
             init_std=0.2)


def small(**overrides) -> LayerSkipLM:
    torch.manual_seed(0)
    return LayerSkipLM(Config(**{**SMALL, **overrides})).double().eval()


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_parameter_names_mirror_hugging_face_llama(tie, bias):
    cfg = Config(**{**SMALL, "tie_embeddings": tie, "attention_bias": bias, "mlp_bias": bias})
    model = LayerSkipLM(cfg)
    assert set(model.state_dict()) == expected_keys(cfg)
    assert ("lm_head.weight" in model.state_dict()) == (not tie)
    assert "layers.3.self_attn.k_proj.weight" in model.state_dict()
    assert model.state_dict()["layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    assert FAMILY.shard_units(model) == list(model.layers)


def test_build_is_deterministic_given_the_rng():
    cfg = Config(**SMALL)
    torch.manual_seed(3)
    a = build(cfg).state_dict()
    torch.manual_seed(3)
    b = build(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layer_ranges_compose_and_exits_use_the_named_layer():
    model = small()
    x = torch.randint(0, 64, (2, 9))
    full, exits = model(x, exit_layers="all")
    assert sorted(exits) == [0, 1, 2, 3]
    torch.testing.assert_close(full, model.head(exits[3]), rtol=0, atol=0)
    for E in range(1, 4):
        early, ex = model(x, end_layer=E, exit_layers=(E - 1,))
        # the exit after layer E-1 is head(output of layer E-1) = a model truncated to E layers
        torch.testing.assert_close(early, model.head(ex[E - 1]), rtol=0, atol=0)
        torch.testing.assert_close(ex[E - 1], exits[E - 1], rtol=0, atol=1e-12)
        late, _ = model(hidden_BTD=ex[E - 1], start_layer=E)
        torch.testing.assert_close(late, full, rtol=0, atol=1e-12)
    _, as_logits = model(x, exit_layers=(1, 3), exit_logits=True)
    torch.testing.assert_close(as_logits[1], model.head(exits[1]), rtol=0, atol=0)
    torch.testing.assert_close(as_logits[3], full, rtol=0, atol=0)
    head_only, _ = model(hidden_BTD=exits[3], start_layer=4)
    torch.testing.assert_close(head_only, full, rtol=0, atol=0)


def test_bad_ranges_are_refused():
    model = small()
    x = torch.randint(0, 64, (1, 3))
    with pytest.raises(ValueError, match="start_layer"):
        model(x, start_layer=3, end_layer=2)
    with pytest.raises(ValueError, match="exit_layers"):
        model(x, end_layer=2, exit_layers=(3,))
    with pytest.raises(ValueError, match="hidden_BTD"):
        model(start_layer=1)


def test_cached_incremental_forward_equals_one_pass():
    model = small(rope_theta=500.0)
    x = torch.randint(0, 64, (2, 12))
    full, _ = model(x)
    cache = model.new_cache()
    pieces = [model(x[:, :5], cache=cache)[0]]
    for t in range(5, 12, 3):
        pieces.append(model(x[:, t:t + 3], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)
    assert cache.lengths == [12] * 4


def test_rotary_table_grows_mid_decode_without_changing_any_output():
    """The (cos, sin) table starts at 256 positions and is rebuilt longer when a later position
    is asked for; decoding across that point still equals one uncached pass, and every entry is
    the angle formula's value."""
    model = small(max_seq_len=1024)
    x = torch.randint(0, 64, (1, 270))
    cache = model.new_cache()
    pieces = [model(x[:, :250], cache=cache)[0]]
    for t in range(250, 270, 4):  # crosses position 256, where the table grows
        pieces.append(model(x[:, t:t + 4], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(x)[0], rtol=0, atol=1e-12)
    cos, sin = model.rotary(600, 3, torch.device("cpu"), torch.float64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    angles = torch.arange(600, 603, dtype=torch.float32)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(cos, angles.cos().repeat(1, 2).double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, angles.sin().repeat(1, 2).double(), rtol=0, atol=1e-6)


def test_layers_may_run_ahead_in_the_cache_and_crop_restores():
    """Drafting layers cache more positions than verifying ones; crop undoes rejected drafts."""
    model = small()
    x = torch.randint(0, 64, (1, 10))
    cache = model.new_cache()
    model(x[:, :6], cache=cache)
    _, ex = model(x[:, 6:9], cache=cache, end_layer=2, exit_layers=(1,))
    assert cache.lengths == [9, 9, 6, 6]
    late, _ = model(hidden_BTD=ex[1], cache=cache, start_layer=2)
    torch.testing.assert_close(late, model(x[:, :9])[0][:, 6:], rtol=0, atol=1e-12)
    cache.crop(7)
    assert cache.lengths == [7] * 4
    nxt, _ = model(x[:, 7:10], cache=cache)
    torch.testing.assert_close(nxt, model(x)[0][:, 7:], rtol=0, atol=1e-12)
    fresh = model.new_cache()
    model(x, cache=fresh)
    for layer in range(4):
        torch.testing.assert_close(cache.keys(layer), fresh.keys(layer), rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.values(layer), fresh.values(layer), rtol=0, atol=1e-12)


def test_cache_grows_past_its_capacity():
    cache = KVCache(1)
    for t in range(0, 200, 50):
        cache.append(0, torch.full((1, 2, 50, 4), float(t)), torch.zeros(1, 2, 50, 4))
    assert cache.lengths == [200] and cache.keys(0)[0, 0, ::50, 0].tolist() == [0, 50, 100, 150]


def test_every_block_runs_on_an_empty_batch():
    model = small().float().train()
    x = torch.randint(0, 64, (0, 5))
    logits, exits = model(x, exit_layers="all")
    assert logits.shape == (0, 5, 64) and all(h.shape == (0, 5, 32) for h in exits.values())
    for block in model.layers:
        cos, sin = model.rotary(0, 5, torch.device("cpu"), torch.float32)
        assert block(torch.zeros(0, 5, 32), cos, sin).shape == (0, 5, 32)


def test_layer_dropout_is_per_sample_identity_and_keeps_every_parameter_in_the_graph():
    model = small().train()
    x = torch.randint(0, 64, (6, 7))
    torch.manual_seed(1)
    probs = [0.0, 0.5, 1.0, 0.5]
    _, exits = model(x, exit_layers="all", drop_probs=probs)
    torch.manual_seed(1)
    keep = torch.rand(4, 6) >= torch.tensor(probs, dtype=torch.float32)[:, None]
    assert not keep[2].any()  # layer 2 is dropped for every sample: it ran on a batch of 0
    with torch.no_grad():
        h = model.embed_tokens(x)
        for i, block in enumerate(model.layers):
            cos, sin = model.rotary(0, 7, h.device, h.dtype)
            h = torch.where(keep[i][:, None, None], block(h, cos, sin), h)
            torch.testing.assert_close(exits[i], h, rtol=0, atol=1e-12)
    model.head(exits[3]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for p in model.layers[2].parameters())


def test_layer_dropout_is_off_in_eval_mode():
    model = small()
    x = torch.randint(0, 64, (3, 5))
    torch.testing.assert_close(model(x, drop_probs=[0.0, 1.0, 1.0, 1.0])[0], model(x)[0])


@pytest.mark.parametrize("field,value,match", [
    ("n_kv_heads", 3, "multiple of n_kv_heads"), ("dim", 30, "multiple of n_heads"),
    ("p_max", 1.5, "p_max"), ("rotation_interval", 0, "rotation_interval"),
    ("early_exit_curriculum", "sometimes", "early_exit_curriculum"), ("head_dim", 5, "even"),
    ("rope_scaling", "yarn", "rope_scaling"),
])
def test_config_mistakes_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**SMALL, field: value})


def test_config_fields_are_plain_typed_and_documented():
    import typing
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        assert tp in (int, float, bool, str) or typing.get_origin(tp) is typing.Literal, f.name
    source = open(__import__("shipyard_models.layerskip.model", fromlist=["x"]).__file__).read()
    for f in dataclasses.fields(Config):
        line = next(l for l in source.splitlines() if l.strip().startswith(f"{f.name}:"))
        nxt = source.splitlines()[source.splitlines().index(line) + 1]
        assert nxt.strip().startswith('"""'), f"{f.name} lacks a docstring line"


def test_explicit_head_dim_works():
    model = small(head_dim=16)  # 4 heads x 16 != dim 32
    assert model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    assert model(torch.randint(0, 64, (1, 4)))[0].shape == (1, 4, 64)
