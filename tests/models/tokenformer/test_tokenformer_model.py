"""TokenFormer's model against the paper's formulas: Pattention, causality, the tied head."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shipyard_models.tokenformer import Config, Pattention, TokenFormerLM, count_parameters

CFG = Config(dim=32, n_layers=2, n_heads=2, qkv_tokens=16, ffn_tokens=32, max_seq_len=16)


def test_pattention_is_the_papers_formula():
    """O = GeLU(A * tau / ||A_i||_2) V with A = X K^T, written out element by element."""
    torch.manual_seed(0)
    layer = Pattention(6, 5, 7).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    K, V = layer.key_tokens.detach(), layer.value_tokens.detach()
    tau = float(layer.tau)  # sqrt(7) rounded to float32 when the layer was created
    want = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        a = [float(x[i] @ K[j]) for j in range(7)]
        norm = math.sqrt(sum(v * v for v in a))
        for j in range(7):
            s = a[j] * tau / norm
            want[i] += 0.5 * s * (1 + math.erf(s / math.sqrt(2))) * V[j]
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-14)
    assert tau == pytest.approx(math.sqrt(7), rel=1e-7)


def test_the_model_is_causal_and_its_head_is_tied():
    torch.manual_seed(0)
    model = TokenFormerLM(CFG).double()
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-12)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-6
    assert a.shape == (2, 12, 256)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(CFG)
    assert not any("head" in n for n, _ in model.named_parameters())  # the embedding is the head


def test_only_persistent_state_is_weights_and_tau():
    model = TokenFormerLM(CFG)
    keys = set(model.state_dict())
    assert "blocks.0.ffn.tau" in keys and not any("rope" in k for k in keys)
    assert not any(n.endswith(("weight", "bias")) for n in keys if n != "embed.weight")  # no norm params


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        Config(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="ffn_tokens must be positive"):
        Config(ffn_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        TokenFormerLM(CFG)(torch.zeros(1, 17, dtype=torch.int64))
