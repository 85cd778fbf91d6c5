"""Hugging Face Llama interop for the LayerSkip model ("LayerSkip: Enabling Early Exit Inference
and Self-Speculative Decoding", Elhoushi et al., 2024, arXiv:2404.16710, whose released
checkpoints are Llama models).

`load_hf(dir)` reads a `LlamaForCausalLM` directory (config.json + model.safetensors, or
safetensors shards with model.safetensors.index.json) into (Config, state_dict); `export_hf`
writes one back. No transformers import: json + safetensors only. Our parameter names are HF's
without the `model.` prefix, so conversion is a prefix change.

Every key a Llama config.json may carry either loads exactly or is refused with a ValueError
naming it:
* grouped-query heads (num_key_value_heads), head_dim (any value, also != hidden / heads),
  tied / untied embeddings, rope_theta, rms_norm_eps, attention_bias, mlp_bias: loaded;
* rotary scaling (`rope_scaling`, or `rope_parameters` as transformers >= 5 writes it):
  "default", "linear" and "llama3" load exactly; any other type (dynamic, yarn, longrope, ...)
  and a partial_rotary_factor != 1 are refused;
* hidden_act other than "silu", attention_dropout != 0, quantization_config, pruned heads,
  encoder-decoder / cross-attention flags and a model_type other than "llama" are refused;
* generation and bookkeeping keys (token ids, dtype, transformers_version, ...) are ignored;
  any key not listed here is refused, so a new architectural option is never silently dropped.
Weights: pytorch_model.bin (pickle) is refused (we never unpickle); an unexpected or missing
tensor is refused; `*.rotary_emb.inv_freq` buffers of old checkpoints are dropped (recomputed).

Deviations, and why:
* `export_hf` writes a single model.safetensors (no sharding) and the legacy `rope_theta` /
  `rope_scaling` keys, which transformers 4.x and 5.x both read.
* Tensors keep the checkpoint's dtype; `build` casts them to the model's dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import Config

__all__ = ["load_hf", "export_hf", "config_from_hf", "config_to_hf", "to_hf_state_dict",
           "check_architecture"]

# Keys that do not change the function the weights compute (generation defaults, labels,
# bookkeeping, inference-only flags).
IGNORED = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "dtype", "torch_dtype", "transformers_version",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "tokenizer_class", "chunk_size_feed_forward", "pretraining_tp",
    "initializer_range", "max_position_embeddings", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "finetuning_task", "prefix", "task_specific_params", "is_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "cross_attention_hidden_size",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
}
# Keys that are fine only with their neutral value.
NEUTRAL = {"is_encoder_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
           "pruned_heads": {}, "attention_dropout": 0.0, "hidden_act": "silu",
           "model_type": "llama", "quantization_config": None}
ARCH = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_theta", "rope_scaling",
        "rope_parameters"}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor"}
# What decides the function the weights compute: (field to set, how to read its effective value).
ARCHITECTURE = (("vocab_size", "vocab_size"), ("dim", "dim"), ("n_layers", "n_layers"),
                ("n_heads", "n_heads"), ("n_kv_heads", "kv_heads"), ("head_dim", "head_size"),
                ("mlp_hidden", "mlp_hidden"), ("rope_theta", "rope_theta"),
                ("rope_scaling", "rope_scaling"), ("rms_norm_eps", "rms_norm_eps"),
                ("tie_embeddings", "tie_embeddings"), ("attention_bias", "attention_bias"),
                ("mlp_bias", "mlp_bias"))
ROPE_SCALING_FIELDS = {"none": (), "linear": ("rope_factor",),
                       "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                  "rope_original_max_seq_len")}


def _refuse(key: str, why: str):
    raise ValueError(f"unsupported Llama config key {key!r}: {why}")


def _rope(hf: dict, max_len: int) -> dict:
    """Config fields of the rotary embedding, from legacy or transformers-5 keys."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        _refuse("rope_parameters", f"expected an object, got {params!r}")
    if set(params) & {"full_attention", "sliding_attention"}:
        _refuse("rope_parameters", "per-layer-type rotary parameters are not Llama's")
    for key in params:
        if key not in ROPE_KEYS:
            _refuse(f"rope_parameters.{key}", "unknown rotary parameter")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", "only full rotary embeddings are supported")
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return {**out, "rope_scaling": "none"}
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_seq_len": int(params.get("original_max_position_embeddings",
                                                            max_len))}
    _refuse("rope_scaling", f"rope type {kind!r} is not supported (only default, linear, llama3)")


def config_from_hf(hf: dict) -> Config:
    """Our Config from a Llama config.json dict; refuses what it cannot load exactly."""
    for key, value in hf.items():
        if key in IGNORED or key in ARCH:
            continue
        if key in NEUTRAL:
            if value not in (NEUTRAL[key], None) or (key == "model_type" and value is None):
                _refuse(key, f"only {NEUTRAL[key]!r} is supported, got {value!r}")
            continue
        _refuse(key, "not a Llama option this loader knows; refusing rather than ignoring it")
    if "architectures" in hf and hf["architectures"] not in (None, ["LlamaForCausalLM"]):
        _refuse("architectures", f"expected ['LlamaForCausalLM'], got {hf['architectures']}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"Llama config.json lacks {key!r}")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    kv_heads = int(hf.get("num_key_value_heads") or n_heads)
    max_len = int(hf.get("max_position_embeddings", 2048))
    return Config(  # n_kv_heads and head_dim 0 when they take their default value
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=0 if kv_heads == n_heads else kv_heads,
        head_dim=0 if head_dim * n_heads == dim else head_dim,
        mlp_hidden=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), max_seq_len=max_len,
        init_std=float(hf.get("initializer_range", 0.02)), **_rope(hf, max_len))


def config_to_hf(cfg: Config, dtype: torch.dtype = torch.float32) -> dict:
    """A LlamaForCausalLM config.json dict for `cfg`."""
    rope_scaling = None
    if cfg.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor,
                        "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "attention_bias": cfg.attention_bias, "attention_dropout": 0.0,
        "mlp_bias": cfg.mlp_bias, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
    }


def expected_keys(cfg: Config) -> set[str]:
    """Our state-dict keys for `cfg`."""
    keys = {"embed_tokens.weight", "norm.weight"}
    if not cfg.tie_embeddings:
        keys.add("lm_head.weight")
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for name in ("q", "k", "v", "o"):
            keys.add(f"{p}self_attn.{name}_proj.weight")
            if cfg.attention_bias:
                keys.add(f"{p}self_attn.{name}_proj.bias")
        for name in ("gate", "up", "down"):
            keys.add(f"{p}mlp.{name}_proj.weight")
            if cfg.mlp_bias:
                keys.add(f"{p}mlp.{name}_proj.bias")
    return keys


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(directory / shard))
        return tensors
    if (directory / "pytorch_model.bin").exists() or list(directory.glob("pytorch_model*.bin")):
        raise ValueError(f"{directory} holds pickled pytorch_model*.bin weights, which are never "
                         f"unpickled here; convert them to safetensors first")
    raise ValueError(f"{directory} has neither model.safetensors nor "
                     f"model.safetensors.index.json")


def load_hf(directory: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(Config, state_dict in our names) of a Hugging Face LlamaForCausalLM directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory} has no config.json (is it a Hugging Face model directory?)")
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    state = {}
    for key, tensor in _read_tensors(directory).items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        state[key.removeprefix("model.")] = tensor
    if cfg.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state.pop("lm_head.weight"), state["embed_tokens.weight"]):
            _refuse("tie_word_embeddings", "true, but lm_head.weight differs from the embedding")
    expected = expected_keys(cfg)
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"weights of {directory} do not match its config: unexpected "
                         f"{unexpected[:5]}, missing {missing[:5]}")
    return cfg, state


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names for our state dict (contiguous, memory-unshared copies for safetensors)."""
    return {(k if k == "lm_head.weight" else f"model.{k}"): v.detach().cpu().contiguous().clone()
            for k, v in state.items()}


def export_hf(model: nn.Module | dict[str, torch.Tensor], cfg: Config,
              directory: str | Path) -> Path:
    """Write `model` (a LayerSkipLM or its full state dict) as a HF LlamaForCausalLM directory:
    config.json and model.safetensors. Returns the directory."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    expected = expected_keys(cfg)
    if set(state) != expected:
        raise ValueError(f"state dict does not match the config: unexpected "
                         f"{sorted(set(state) - expected)[:5]}, missing "
                         f"{sorted(expected - set(state))[:5]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = state["embed_tokens.weight"].dtype
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    save_file(to_hf_state_dict(state), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def check_architecture(cfg: Config, loaded: Config, source: str) -> None:
    """Refuse, naming every differing field, when `cfg` does not describe `loaded`.

    Compared: everything that changes the function the weights compute (shapes, rotary
    embedding, norm epsilon, tying, biases), by effective value (n_kv_heads 0 equals n_heads,
    head_dim 0 equals dim // n_heads). Not compared: max_seq_len, init_std and the recipe.
    """
    pairs = list(ARCHITECTURE) + [(f, f) for f in ROPE_SCALING_FIELDS[loaded.rope_scaling]]
    diffs = [f"{name}: spec has {getattr(cfg, name)!r}, {source} needs {getattr(loaded, attr)!r}"
             for name, attr in pairs if getattr(cfg, attr) != getattr(loaded, attr)]
    if diffs:
        raise ValueError(f"model config does not match {source}: " + "; ".join(diffs))
