"""Self-speculative decoding: greedy output equals greedy autoregressive decoding, the cache is
exactly what a fresh forward gives after every round, and speculative sampling draws from the
full model's distribution. Models run in float64 so argmax ties cannot flip between the
one-position and the many-position forwards."""
import pytest
import torch

from shipyard_models.layerskip import Config, LayerSkipLM, generate, self_speculative_generate
from shipyard_models.layerskip.speculative import distribution, speculative_accept

L = 6


def random_model(vocab: int = 64, seed: int = 0) -> LayerSkipLM:
    torch.manual_seed(seed)
    cfg = Config(vocab_size=vocab, dim=32, n_layers=L, n_heads=4, n_kv_heads=2, mlp_hidden=64,
                 init_std=0.3, rope_theta=1000.0)
    return LayerSkipLM(cfg).double().eval()


def identity_above(model: LayerSkipLM, E: int) -> LayerSkipLM:
    """Zero the output projections of layers E.. so they are identities: drafts always pass."""
    with torch.no_grad():
        for block in model.layers[E:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("E", [1, L // 2, L - 1])
@pytest.mark.parametrize("d", [1, 3, 8])
def test_greedy_self_speculative_equals_greedy_autoregressive(model, prompt, E, d):
    want, ar = generate(model, prompt, 23)
    got, st = self_speculative_generate(model, prompt, 23, exit_layer=E, draft_len=d)
    assert torch.equal(got, want) and got.shape[1] == 7 + 23  # 23 is no multiple of 3 or 8
    assert st.new_tokens == 23 and ar.layer_forwards_per_token == L
    assert st.drafted >= st.accepted and st.rounds >= 23 / (d + 1)
    assert st.acceptance_rate < 1.0  # a random model rejects drafts: the correction path runs
    assert st.tokens_per_round == pytest.approx(23 / st.rounds)
    assert st.tokens_per_s > 0


@pytest.mark.parametrize("confidence", [0.5, 0.99])
def test_a_draft_confidence_stop_drafts_less_and_changes_no_token(model, prompt, confidence):
    """Stopping a round's drafting at an unsure draft saves early passes, never output tokens."""
    want, _ = generate(model, prompt, 23)
    _, full = self_speculative_generate(model, prompt, 23, exit_layer=2, draft_len=8)
    got, st = self_speculative_generate(model, prompt, 23, exit_layer=2, draft_len=8,
                                        draft_confidence=confidence)
    assert torch.equal(got, want)
    assert st.drafted / st.rounds < full.drafted / full.rounds
    if confidence == 0.99:  # a random 64-way exit is never that sure: one draft per round
        assert st.drafted == st.rounds
    torch.manual_seed(0)
    sampled, _ = self_speculative_generate(model, prompt, 23, exit_layer=2, draft_len=8, temperature=1.0,
                                           draft_confidence=confidence,
                                           generator=torch.Generator().manual_seed(3))
    assert sampled.shape == (1, 30)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_identity_upper_layers_accept_every_draft(prompt, d):
    model = identity_above(random_model(), L // 2)
    want, _ = generate(model, prompt, 20)
    got, st = self_speculative_generate(model, prompt, 20, exit_layer=L // 2, draft_len=d)
    assert torch.equal(got, want)
    assert st.acceptance_rate == 1.0 and st.accepted == st.drafted
    full_rounds = 20 // (d + 1)
    assert st.rounds == full_rounds + (20 % (d + 1) > 0)
    assert st.layer_forwards_per_token == pytest.approx(L * (st.drafted + st.rounds) / 20)


@pytest.mark.parametrize("identity", [True, False])
def test_a_stop_token_inside_a_draft_ends_generation_like_autoregressive(prompt, identity):
    model = random_model()
    if identity:
        model = identity_above(model, L // 2)
    free, _ = generate(model, prompt, 30)
    new = free[0, 7:].tolist()
    stop = next(t for i, t in enumerate(new) if i >= 5 and t not in new[:i])  # first seen late
    want, _ = generate(model, prompt, 30, stop_tokens=[stop])
    assert want[0, -1].item() == stop and want.shape[1] < free.shape[1]
    got, st = self_speculative_generate(model, prompt, 30, exit_layer=L // 2, draft_len=8,
                                        stop_tokens=[stop])
    assert torch.equal(got, want)
    if identity:  # everything accepted: the stop token was drafted mid-round, not a correction
        assert st.acceptance_rate == 1.0 and st.rounds == 1


def test_cache_after_every_round_equals_a_fresh_forward(model, prompt):
    rounds = []

    def check(seq, cache):
        fresh = model.new_cache()
        model(torch.tensor([seq[:-1]]), cache=fresh)
        assert cache.lengths == [len(seq) - 1] * L
        for layer in range(L):
            torch.testing.assert_close(cache.keys(layer), fresh.keys(layer), rtol=0, atol=1e-10)
            torch.testing.assert_close(cache.values(layer), fresh.values(layer), rtol=0,
                                       atol=1e-10)
        rounds.append(len(seq))

    _, st = self_speculative_generate(model, prompt, 17, exit_layer=2, draft_len=3,
                                      on_round=check)
    assert len(rounds) == st.rounds and rounds[-1] == 7 + 17


def test_batched_autoregressive_rows_stop_independently():
    model = random_model()
    prompts = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    free, _ = generate(model, prompts, 12)
    stop = free[1, 8].item()
    out, st = generate(model, prompts, 12, stop_tokens=[stop])
    for row in range(3):
        alone, _ = generate(model, prompts[row:row + 1], 12, stop_tokens=[stop])
        n = alone.shape[1]
        assert torch.equal(out[row, :n], alone[0])
        assert (out[row, n:] == stop).all()
    assert st.new_tokens == sum(_new_until(free[r, 5:], stop) for r in range(3))


def _new_until(row, stop):
    hits = (row == stop).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(row)


def test_early_exit_generation_uses_only_the_first_layers(model, prompt):
    early, st = generate(model, prompt, 6, exit_layer=2)
    truncated = LayerSkipLM(Config(**{**model.cfg.__dict__, "n_layers": 2})).double().eval()
    truncated.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("layers.") or int(k.split(".")[1]) < 2})
    assert torch.equal(early, generate(truncated, prompt, 6)[0])
    assert st.layer_forwards_per_token == 2


def test_tiny_top_p_is_greedy(model, prompt):
    greedy, _ = generate(model, prompt, 10)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_p=1e-9, generator=gen)[0],
                       greedy)
    got, _ = self_speculative_generate(model, prompt, 10, exit_layer=3, draft_len=3,
                                       temperature=0.7, top_p=1e-9, generator=gen)
    assert torch.equal(got, greedy)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(len(counts) - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def test_speculative_acceptance_rule_preserves_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1], dtype=torch.float64)
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(20000):
        draft = int(torch.multinomial(q, 1, generator=gen))
        a, extra = speculative_accept(torch.stack([p, p]), q[None], [draft], gen)
        counts[draft if a == 1 else extra] += 1
    assert chi_square_p_value(counts, p) > 1e-3
    naive = torch.multinomial(q, 20000, replacement=True, generator=gen)
    assert chi_square_p_value(torch.bincount(naive, minlength=5).double(), p) < 1e-6  # power


def test_self_speculative_sampling_draws_the_first_token_from_the_full_model():
    model = random_model(vocab=8, seed=3)
    prompt = torch.tensor([[1, 5, 2, 7]])
    with torch.no_grad():
        p = distribution(model(prompt)[0][0, -1], temperature=2.0)
        q = distribution(model(prompt, end_layer=2)[0][0, -1], temperature=2.0)
    assert (p - q).abs().sum() > 0.3  # the draft distribution is clearly different
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(8, dtype=torch.float64)
    accepted = 0
    for _ in range(1500):
        out, st = self_speculative_generate(model, prompt, 1, exit_layer=2, draft_len=2,
                                            temperature=2.0, generator=gen)
        counts[out[0, -1]] += 1
        accepted += st.accepted
    assert 300 < accepted < 1200  # both the accept and the resample branch ran often
    assert chi_square_p_value(counts, p) > 1e-3
    assert chi_square_p_value(counts, q) < 1e-6  # the test has power


def test_bad_arguments_are_refused(model, prompt):
    with pytest.raises(ValueError, match="batch size 1"):
        self_speculative_generate(model, prompt.repeat(2, 1), 3, exit_layer=2, draft_len=2)
    with pytest.raises(ValueError, match="exit_layer"):
        self_speculative_generate(model, prompt, 3, exit_layer=L, draft_len=2)
    with pytest.raises(ValueError, match="draft_len"):
        self_speculative_generate(model, prompt, 3, exit_layer=2, draft_len=0)
    with pytest.raises(ValueError, match="draft_confidence"):
        self_speculative_generate(model, prompt, 3, exit_layer=2, draft_len=2, draft_confidence=1.0)
