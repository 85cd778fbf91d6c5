"""Hugging Face Llama interop: tiny random `LlamaForCausalLM`s built locally with transformers
(never downloaded) load into our model with the same logits, our exports load into transformers
with the same logits, unsupported variants are refused by name, and greedy self-speculative
decoding equals transformers' `generate` with and without `assistant_early_exit`.

Tolerance: both sides run float32 with the same operations in the same order (RMSNorm, float32
rotary angles from float32 inverse frequencies, SDPA), and on this CPU the logits agree bitwise.
Another attention kernel or BLAS may sum in another order: each reduction over K <= 64 terms then
differs by a few float32 ulps (1.2e-7) times sqrt(K), below ~1e-6 on logits of magnitude ~1
through 3 layers, so atol = rtol = 1e-5 leaves a 10x margin, while any real mismatch (a wrong
rotary half, a missing bias, the wrong epsilon or rope scaling) moves logits by 1e-2 or more.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from shipyard_models.layerskip import (  # noqa: E402
    Config, LayerSkipLM, build, export_hf, generate, load_hf, self_speculative_generate)

TOL = dict(atol=1e-5, rtol=1e-5)
VARIANTS = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "tied-llama3-bias": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16},
                             attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
    "linear-headdim-mqa": dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                               rope_theta=1000.0, rope_scaling={"rope_type": "linear",
                                                                "factor": 4.0}),
}


def hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.15,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(LlamaConfig(**{**kwargs, **overrides})).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: randomise them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(directory) -> LayerSkipLM:
    cfg, state = load_hf(directory)
    model = LayerSkipLM(cfg).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoints_load_with_the_same_logits(tmp_path, variant):
    reference = hf_model(**VARIANTS[variant])
    reference.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(tokens).logits
        got, _ = ours(tokens)
    assert want.abs().max() > 0.3  # not a degenerate model
    torch.testing.assert_close(got, want, **TOL)


EXPORTS = {
    "untied-gqa-llama3-bias-headdim": dict(
        n_kv_heads=2, head_dim=16, rope_theta=20000.0, rope_scaling="llama3", rope_factor=4.0,
        rope_original_max_seq_len=32, tie_embeddings=False, attention_bias=True, mlp_bias=True),
    "tied-linear": dict(tie_embeddings=True, rope_scaling="linear", rope_factor=2.0,
                        rms_norm_eps=1e-6),
}


@pytest.mark.parametrize("variant", sorted(EXPORTS))
def test_our_export_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    torch.manual_seed(0)
    cfg = Config(vocab_size=96, dim=32, n_layers=3, n_heads=4, mlp_hidden=48, init_std=0.15,
                 max_seq_len=128, **EXPORTS[variant])
    ours = LayerSkipLM(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    export_hf(ours, cfg, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 96, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens)[0], **TOL)
    again, state = load_hf(tmp_path)  # and back: the same config and tensors
    assert again == Config(**{**cfg.__dict__, "p_max": again.p_max})
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


def test_sharded_checkpoints_load(tmp_path):
    reference = hf_model(**VARIANTS["gqa-untied"])
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = ours_from(tmp_path)
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], reference(tokens).logits, **TOL)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_model(**VARIANTS["gqa-untied"]).save_pretrained(directory)
    return directory


def edited(saved, tmp_path, **changes):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("changes,named", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"model_type": "mistral"}, "model_type"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"architectures": ["LlamaModel"]}, "architectures"),
])
def test_unsupported_config_variants_are_refused_by_name(saved, tmp_path, changes, named):
    with pytest.raises(ValueError, match=named):
        load_hf(edited(saved, tmp_path, **changes))


def test_legacy_rope_keys_load(saved, tmp_path):
    legacy = edited(saved, tmp_path, rope_parameters=None, rope_theta=5000.0,
                    rope_scaling={"type": "linear", "factor": 2.0})
    cfg, _ = load_hf(legacy)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (5000.0, "linear", 2.0)


def test_weight_problems_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    directory = edited(saved, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*lm_head"):
        load_hf(directory)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model"):
        load_hf(directory)


def test_build_init_from_loads_or_names_the_mismatch(saved):
    cfg, _ = load_hf(saved)
    spec = Config(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=48,
                  rms_norm_eps=1e-6, tie_embeddings=False, init_from=str(saved))
    model = build(spec).eval()
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], ours_from(saved)(tokens)[0], rtol=0, atol=0)
    wrong = Config(**{**spec.__dict__, "dim": 64, "n_kv_heads": 4, "rope_theta": 500.0})
    with pytest.raises(ValueError, match=r"dim: spec has 64.*n_kv_heads: spec has 4.*rope_theta"):
        build(wrong)


@pytest.mark.parametrize("E", [1, 2])
def test_greedy_self_speculative_equals_transformers_generate(tmp_path, E):
    reference = hf_model(seed=3, num_hidden_layers=4, initializer_range=0.3,
                         num_key_value_heads=2).double()
    reference.save_pretrained(tmp_path)
    ours = ours_from(tmp_path).double()
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(prompt),
                  pad_token_id=0)
    plain = reference.generate(prompt, **kwargs)
    assisted = reference.generate(prompt, assistant_early_exit=E, **kwargs)
    mine, stats = self_speculative_generate(ours, prompt, 24, exit_layer=E, draft_len=4)
    assert torch.equal(plain, assisted)
    assert torch.equal(mine, plain)
    assert torch.equal(generate(ours, prompt, 24)[0], plain)
    assert stats.acceptance_rate < 1.0
