"""The training recipe: the paper's layer-dropout and early-exit formulas, the curricula, the
objective computed inside forward, evaluation metrics and exact resume."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from shipyard_models.layerskip import FAMILY, Config, LayerSkipLM, build, recipe

BASE = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, mlp_hidden=48, init_std=0.2)


def cfg(**overrides) -> Config:
    return Config(**{**BASE, **overrides})


def test_layer_dropout_rates_follow_the_paper():
    c = cfg(n_layers=5, p_max=0.2, dropout_schedule="exponential")
    L, T = 5, 100
    for t in (0, 37, 100):
        s = 2 ** (t / T) - 1
        expected = [s * (2 ** (l / (L - 1)) - 1) * 0.2 for l in range(L)]
        assert recipe.drop_probs(c, t, T) == pytest.approx(expected, abs=1e-15)
    assert recipe.drop_probs(c, 0, T) == [0.0] * 5  # S(0) = 0: pretraining starts without
    assert recipe.drop_probs(c, T, T)[-1] == pytest.approx(0.2)  # last layer reaches p_max
    const = cfg(n_layers=5, p_max=0.2)
    assert recipe.drop_probs(const, 0, T) == recipe.drop_probs(const, 99, T)
    assert recipe.drop_probs(const, 5, T)[0] == 0.0  # layer 0 is never dropped
    assert recipe.drop_probs(cfg(p_max=0.0), 5, T) == [0.0] * 4


def test_early_exit_weights_follow_the_paper():
    L, e = 6, 0.3
    raw = [e * sum(range(l + 1)) for l in range(L - 1)] + [(L - 1) + e * sum(range(L - 1))]
    assert [recipe.exit_scale(l, L, e) for l in range(L)] == pytest.approx(raw)
    c = cfg(n_layers=L, e_scale=e, early_exit_curriculum="rotational", rotation_interval=1)
    w = recipe.exit_weights(c, 7, 100)  # R = 1: every layer enabled
    assert sorted(w) == list(range(L))
    assert [w[l] for l in range(L)] == pytest.approx([r / sum(raw) for r in raw])
    assert w[0] == 0.0  # e(0) = 0
    plain = recipe.exit_weights(cfg(early_exit_curriculum="none"), 3, 10)
    assert plain == {3: 1.0}
    assert recipe.exit_weights(cfg(e_scale=0.0), 1, 10) == {1: 0.0, 3: 1.0}


def test_rotational_curriculum_rotates_and_always_keeps_the_last_layer():
    c = cfg(n_layers=7, early_exit_curriculum="rotational", rotation_interval=3)
    assert [recipe.enabled_exits(c, t, 50) for t in range(4)] == [
        [0, 3, 6], [1, 4, 6], [2, 5, 6], [0, 3, 6]]


def test_gradual_curriculum_switches_layers_on_from_the_top_by_half_time():
    c = cfg(n_layers=4, early_exit_curriculum="gradual")
    T = 80  # one more layer every T / (2L) = 10 steps
    got = {t: recipe.enabled_exits(c, t, T) for t in (0, 9, 10, 19, 20, 30, 40, 79)}
    assert got == {0: [3], 9: [3], 10: [2, 3], 19: [2, 3], 20: [1, 2, 3], 30: [0, 1, 2, 3],
                   40: [0, 1, 2, 3], 79: [0, 1, 2, 3]}
    short = recipe.enabled_exits(c, 1, 3)  # T / 2L < 1 step: still well defined
    assert short == [1, 2, 3]


def test_curriculum_state_is_a_pure_json_function_of_step_and_total():
    c = cfg(n_layers=6, p_max=0.3, dropout_schedule="exponential",
            early_exit_curriculum="rotational", rotation_interval=2, e_scale=0.5)
    T = 40
    forward = [recipe.curriculum_state(c, t, T) for t in range(T + 1)]
    backward = [recipe.curriculum_state(copy.deepcopy(c), t, T) for t in reversed(range(T + 1))]
    assert forward == backward[::-1]
    state = json.loads(json.dumps(forward[13]))
    assert state == forward[13]
    assert state["exit_layers"] == [1, 3, 5] and sum(state["exit_weights"]) == pytest.approx(1)
    assert state["dropout_scale"] == pytest.approx(2 ** (13 / 40) - 1)
    assert len(state["drop_probs"]) == 6
    assert FAMILY.curriculum_state(c, 13, T) == forward[13]


def test_objective_is_the_weighted_sum_of_exit_cross_entropies():
    c = cfg(early_exit_curriculum="rotational", rotation_interval=2, e_scale=0.7, p_max=0.0)
    torch.manual_seed(0)
    model = LayerSkipLM(c).double()
    tokens = torch.randint(0, 64, (3, 11))
    loss, metrics = FAMILY.loss(model, {"tokens": tokens}, 5, 100)  # step 5: layers 1, 3
    x, y = tokens[:, :-1], tokens[:, 1:].flatten()
    ce = {}
    for l in (1, 3):  # a model truncated after layer l, decoded by the shared head
        logits, _ = model(x, end_layer=l + 1)
        ce[l] = F.cross_entropy(logits.flatten(0, 1), y)
    w = recipe.exit_weights(c, 5, 100)
    assert set(w) == {1, 3}
    torch.testing.assert_close(loss, w[1] * ce[1] + w[3] * ce[3])
    torch.testing.assert_close(metrics["final_loss"], ce[3].detach())
    assert metrics["bits_per_byte"].item() == pytest.approx(ce[3].item() / math.log(2))
    assert set(metrics) == {"loss", "final_loss", "bits_per_byte", "exits_enabled",
                            "dropout_scale"}


def test_plain_curriculum_without_dropout_is_the_ordinary_lm_loss():
    c = cfg(early_exit_curriculum="none", p_max=0.0)
    torch.manual_seed(0)
    model = LayerSkipLM(c).train()
    tokens = torch.randint(0, 64, (2, 9))
    loss, _ = FAMILY.loss(model, {"tokens": tokens}, 0, 10)
    logits, _ = model(tokens[:, :-1])
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


def test_evaluate_reports_every_exit():
    torch.manual_seed(0)
    model = LayerSkipLM(cfg()).eval()
    tokens = torch.randint(0, 64, (5, 9))
    with torch.no_grad():
        m = FAMILY.evaluate(model, {"tokens": tokens})
        logits, exits = model(tokens[:, :-1], exit_layers="all", exit_logits=True)
    assert set(m) == {f"exit_loss/l{l}" for l in range(4)} | {f"agree/l{l}" for l in range(4)} \
        | {"loss", "bits_per_byte"}
    assert m["agree/l3"].item() == 1.0 and m["loss"] == m["exit_loss/l3"]
    y = tokens[:, 1:].flatten()
    ce1 = F.cross_entropy(exits[1].flatten(0, 1), y)
    assert m["exit_loss/l1"].item() == pytest.approx(ce1.item(), rel=1e-5)
    agree = (exits[1].argmax(-1) == logits.argmax(-1)).float().mean()
    assert m["agree/l1"].item() == pytest.approx(agree.item())


def _train(model, opt, c, batches, steps, total):
    losses = []
    for step in steps:
        loss, _ = FAMILY.loss(model, {"tokens": batches[step]}, step, total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resumed_training_continues_curricula_and_layer_dropout_exactly():
    c = cfg(p_max=0.6, dropout_schedule="exponential", early_exit_curriculum="gradual")
    T = 12
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(T)]
    torch.manual_seed(0)
    model = build(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    straight = _train(model, opt, c, batches, range(T), T)

    torch.manual_seed(0)
    model = build(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = _train(model, opt, c, batches, range(5), T)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             torch.get_rng_state(), FAMILY.curriculum_state(c, 5, T))
    torch.manual_seed(123)  # a new process: different RNG until the checkpoint restores it
    model = build(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    assert FAMILY.curriculum_state(c, 5, T) == saved[3]
    rest = _train(model, opt, c, batches, range(5, T), T)
    assert first + rest == straight
