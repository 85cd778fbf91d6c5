"""MinRNNLM: recurrent generation equals the parallel model; the family seam is as documented."""
import dataclasses
import typing

import pytest
import torch

from shipyard_models.family import Family
from shipyard_models.minrnn import FAMILY, Block, Config, DataConfig, MinRNNLM


def _model(cell, **kw):
    torch.manual_seed(0)
    return MinRNNLM(Config(cell=cell, dim=32, depth=2, expansion=1.5, mlp_ratio=2.0, **kw)).eval()


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_greedy_generation_with_state_equals_rerunning_the_parallel_model(cell):
    model = _model(cell)
    prompt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12)
        assert out.shape == (2, 17)
        torch.testing.assert_close(out[:, :5], prompt)
        # the same continuation, re-running the parallel model on every growing prefix
        seq = prompt
        for _ in range(12):
            logits_full, _ = model(seq)
            seq = torch.cat([seq, logits_full[:, -1].argmax(-1, keepdim=True)], dim=1)
        torch.testing.assert_close(out, seq)
        # and the per-step logits agree with the parallel logits at every position
        logits_par, state_par = model(out)
        state = model.init_state(2)
        for t in range(out.shape[1]):
            logits_t, state = model.step(out[:, t], state)
            torch.testing.assert_close(logits_t, logits_par[:, t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state, state_par, rtol=1e-4, atol=1e-5)


def test_dropout_acts_in_training_only():
    plain, dropped = _model("mingru"), _model("mingru", dropout=0.5)
    dropped.load_state_dict(plain.state_dict())  # same weights; dropout has no parameters
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(dropped(tokens)[0], plain(tokens)[0], rtol=0, atol=0)
        assert not torch.allclose(dropped.train()(tokens)[0], plain.train()(tokens)[0])


def test_state_carries_across_calls():
    model = _model("mingru")
    tokens = torch.randint(0, 256, (3, 30))
    with torch.no_grad():
        logits, state = model(tokens)
        logits_a, state_a = model(tokens[:, :13])
        logits_b, state_b = model(tokens[:, 13:], state_a)
    torch.testing.assert_close(torch.cat([logits_a, logits_b], dim=1), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state_b, state, rtol=1e-4, atol=1e-5)
    assert state.shape == (2, 3, model.cfg.inner)


def test_sampling_is_reproducible_with_a_generator():
    model = _model("minlstm")
    prompt = torch.randint(0, 256, (2, 3))
    runs = [model.generate(prompt, 8, temperature=1.0, top_k=20,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.parametrize("scan", ["log", "sequential"])
def test_scan_choice_does_not_change_the_model(scan):
    tokens = torch.randint(0, 256, (2, 20))
    fast, other = _model("minlstm"), _model("minlstm", scan=scan)
    other.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(tokens)[0], fast(tokens)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the Family seam

ALLOWED = (int, float, bool, str)


@pytest.mark.parametrize("cls", [Config, DataConfig])
def test_config_fields_are_plain_typed(cls):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        assert tp in ALLOWED or typing.get_origin(tp) is typing.Literal, (field.name, tp)
        assert field.default is not dataclasses.MISSING, field.name


@pytest.mark.parametrize("cls,kw,field", [
    (Config, {"dim": 0}, "dim"), (Config, {"cell": "gru"}, "cell"),
    (Config, {"chunk": -1}, "chunk"), (Config, {"dropout": 1.0}, "dropout"),
    (DataConfig, {"seq_len": 0}, "seq_len"), (DataConfig, {"val_every": 1}, "val_every"),
])
def test_config_mistakes_name_the_field(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(**kw)


def test_family_entry_behaves_as_documented(tmp_path):
    assert isinstance(FAMILY, Family) and FAMILY.name == "minrnn"
    assert FAMILY.Config is Config and FAMILY.DataConfig is DataConfig
    assert FAMILY.curriculum_state is None
    cfg = Config(dim=32, depth=3, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = FAMILY.build(cfg)
    torch.manual_seed(0)
    again = FAMILY.build(cfg)
    for p, q in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)

    train, val = FAMILY.datasets(cfg, DataConfig(seq_len=64, max_bytes=100_000), tmp_path)
    assert len(train) > 0 and len(val) > 0
    batch = {"tokens": torch.stack([train[i]["tokens"] for i in range(4)])}
    assert batch["tokens"].shape == (4, 65) and batch["tokens"].dtype == torch.int64

    loss, metrics = FAMILY.loss(model, batch, 0, 100)
    assert loss.requires_grad and torch.isfinite(loss)
    assert set(metrics) == {"loss", "bits_per_byte"}
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    with torch.no_grad():
        val_metrics = FAMILY.evaluate(model, {"tokens": torch.stack([val[0]["tokens"]])})
    assert set(val_metrics) == {"loss", "bits_per_byte"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in val_metrics.values())

    units = FAMILY.shard_units(model)
    assert len(units) == 3 and all(isinstance(u, Block) for u in units)


def test_text_round_trips_through_byte_tokens():
    from shipyard_models.minrnn import decode, encode
    text = "def f(x):\n    return 'é' + x\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 256
    assert decode(tokens) == text
    assert decode(torch.tensor([0xC3])) == "\ufffd"
