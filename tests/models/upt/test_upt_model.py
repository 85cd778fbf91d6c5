"""Properties the paper implies for UPT: a decoder whose queries are independent, an encoder
invariant to the order of its inputs whose latent converges as the discretisation is refined,
a fixed latent size, adaLN-Zero conditioning, switchable inverse losses, and the two rollouts.
Float64 where equality is asserted (tolerances are rounding only)."""

import pytest
import torch

from shipyard_models.data.flows import evaluate_at, random_field, sample_points
from shipyard_models.upt import FAMILY, Config
from shipyard_models.upt.model import UPT, radius_graph

TINY = dict(dim=32, heads=4, encoder_depth=1, approximator_depth=2, decoder_depth=2, latent_tokens=8,
            radius=0.2, max_neighbours=16, pos_freqs=4)



def tiny(**overrides) -> UPT:
    torch.manual_seed(0)
    model = UPT(Config(**{**TINY, **overrides})).double().eval()
    # adaLN-Zero starts as the identity; give the approximator non-zero gates so tests see it act
    with torch.no_grad():
        for block in model.approximator.blocks:
            block.modulation[1].weight.normal_(0, 0.05)
    return model


def field_at(points, seed=0, max_mode=2):
    w = random_field(points.shape[0], 32, max_mode, generator=torch.Generator().manual_seed(seed))
    return evaluate_at(w, points)[..., None]


def batch(b=2, n=300, q=50, s=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = sample_points(b, n, gen, dtype=torch.float64)
    out = sample_points(b, q, gen, dtype=torch.float64)
    return {"input_pos": pos, "input_values": field_at(pos, seed), "supernode_pos": pos[:, :s],
            "output_pos": out, "target": field_at(out, seed), "previous": field_at(out, seed),
            "timestep": torch.tensor([0.0, 3.0], dtype=torch.float64)[:b],
            "params": torch.randn(b, 2, generator=gen, dtype=torch.float64)}


def test_decoder_queries_are_independent():
    model, b = tiny(), batch()
    latent = model.encode(b["input_pos"], b["input_values"], b["supernode_pos"])
    queries = b["output_pos"]
    extra = sample_points(2, 77, torch.Generator().manual_seed(5), dtype=torch.float64)
    alone = model.decode(latent, queries)
    with_more = model.decode(latent, torch.cat([extra[:, :30], queries, extra[:, 30:]], dim=1))
    torch.testing.assert_close(with_more[:, 30:80], alone, rtol=0, atol=1e-12)
    one_by_one = torch.cat([model.decode(latent, queries[:, i:i + 1]) for i in range(10)], 1)
    torch.testing.assert_close(one_by_one, alone[:, :10], rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_neighbours", [0, 16])
def test_encoder_is_invariant_to_the_order_of_the_inputs(max_neighbours):
    model, b = tiny(max_neighbours=max_neighbours), batch()
    perm = torch.randperm(b["input_pos"].shape[1], generator=torch.Generator().manual_seed(1))
    latent = model.encode(b["input_pos"], b["input_values"], b["supernode_pos"])
    shuffled = model.encode(b["input_pos"][:, perm], b["input_values"][:, perm], b["supernode_pos"])
    torch.testing.assert_close(shuffled, latent, rtol=0, atol=1e-12)
    assert latent.shape == (2, TINY["latent_tokens"], TINY["dim"])


def test_latent_size_does_not_depend_on_the_number_of_inputs():
    model = tiny()
    for n in (30, 3000):
        b = batch(n=n)
        assert model.encode(b["input_pos"], b["input_values"], b["supernode_pos"]).shape == (2, 8, 32)


def test_radius_graph_is_periodic_and_capped_to_the_nearest():
    supernode = torch.tensor([[[0.02, 0.5]]])
    inputs = torch.tensor([[[0.97, 0.5], [0.10, 0.5], [0.5, 0.5], [0.03, 0.52]]])
    b, s, n, offset = radius_graph(inputs, supernode, radius=0.1)
    assert sorted(n.tolist()) == [0, 1, 3]  # 0.97 is 0.05 away across the boundary
    torch.testing.assert_close(offset[n.tolist().index(0)], torch.tensor([-0.05, 0.0]))
    _, _, n, _ = radius_graph(inputs, supernode, radius=0.1, max_neighbours=2)
    assert sorted(n.tolist()) == [0, 3]


def test_discretisation_convergence_of_the_latent():
    # Fixed supernodes (a 4 x 4 grid), no neighbour cap: each supernode averages messages over its
    # disc, a Monte-Carlo estimate of an integral, so latents of two independent samplings of N
    # points differ by O(N^-1/2). We require a fitted log-log slope below -0.35 (the expected
    # -0.5 minus a margin for the noise of 4 pairs per N); a discretisation-dependent encoder
    # (e.g. sum instead of mean aggregation) gives a slope >= 0.
    model = tiny(max_neighbours=0, radius=0.2)
    s = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    supernodes = torch.stack(torch.meshgrid(s, s, indexing="xy"), -1).reshape(1, 16, 2)
    sizes, gaps = [256, 1024, 4096, 16384], []
    w = random_field(1, 32, 2, generator=torch.Generator().manual_seed(0))
    for n in sizes:
        diffs = []
        for rep in range(4):
            latents = []
            for draw in range(2):
                pos = sample_points(1, n, torch.Generator().manual_seed(1000 * n + 10 * rep + draw),
                                    dtype=torch.float64)
                latents.append(model.encode(pos, evaluate_at(w, pos)[..., None], supernodes))
            diffs.append(((latents[0] - latents[1]).norm() / latents[0].norm()).item())
        gaps.append(sum(diffs) / len(diffs))
    x = torch.log(torch.tensor(sizes, dtype=torch.float64))
    y = torch.log(torch.tensor(gaps, dtype=torch.float64))
    slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    print(f"relative latent gap per N {dict(zip(sizes, [f'{g:.2e}' for g in gaps]))}, slope {slope:.2f}")
    assert slope < -0.35


def test_untrained_approximator_is_the_identity_and_conditioning_matters_once_trained():
    torch.manual_seed(0)
    fresh = UPT(Config(**TINY)).double()
    b = batch()
    z = fresh.encode(b["input_pos"], b["input_values"], b["supernode_pos"])
    torch.testing.assert_close(fresh.step(z, b["timestep"], b["params"]), z, rtol=0, atol=0)
    model = tiny()
    z = model.encode(b["input_pos"], b["input_values"], b["supernode_pos"])
    base = model.step(z, b["timestep"], b["params"])
    assert (model.step(z, b["timestep"] + 1, b["params"]) - base).abs().max() > 1e-4
    assert (model.step(z, b["timestep"], b["params"] + 0.5) - base).abs().max() > 1e-4


def test_inverse_losses_are_switched_by_their_weights():
    b = batch()
    plain = tiny()
    loss, metrics = FAMILY.loss(plain, b, 0, 1)
    assert set(plain(b)) == {"prediction"}
    assert "inverse_encoding" not in metrics and "inverse_decoding" not in metrics
    torch.testing.assert_close(loss, metrics["mse"], rtol=0, atol=0)
    both = tiny(inverse_encoding_weight=0.5, inverse_decoding_weight=2.0)
    loss, metrics = FAMILY.loss(both, b, 0, 1)
    torch.testing.assert_close(loss, metrics["mse"] + 0.5 * metrics["inverse_encoding"]
                               + 2.0 * metrics["inverse_decoding"], rtol=1e-12, atol=0)
    # inverse encoding decodes the encoded input at the input points
    out = both(b)
    z = both.encode(b["input_pos"], b["input_values"], b["supernode_pos"])
    torch.testing.assert_close(out["reconstruction"], both.decode(z, b["input_pos"]), rtol=0, atol=1e-12)
    loss.backward()  # both terms reach the encoder
    assert both.encoder.pooling.message[0].weight.grad.abs().sum() > 0


def test_latent_and_physical_rollouts():
    model, b = tiny(), batch()
    args = (b["input_pos"], b["input_values"], b["supernode_pos"], b["timestep"], b["params"])
    latent = model.rollout_latent(*args, steps=4, query_pos=b["output_pos"])
    physical = model.rollout_physical(*args, steps=4, query_pos=b["output_pos"])
    assert latent.shape == physical.shape == (2, 4, 50, 1)
    first = model(b)["prediction"]
    torch.testing.assert_close(latent[:, 0], first, rtol=0, atol=1e-12)
    torch.testing.assert_close(physical[:, 0], first, rtol=0, atol=1e-12)
    z = model.encode(*args[:3])
    for k in range(3):
        z = model.step(z, b["timestep"] + k, b["params"])
    torch.testing.assert_close(latent[:, 2], model.decode(z, b["output_pos"]), rtol=0, atol=1e-12)
    assert not torch.allclose(latent[:, 3], physical[:, 3])  # re-encoding is a different path


@pytest.mark.parametrize("field,value,match", [("dim", 30, "divisible"), ("radius", 0.7, "radius"),
                                               ("max_neighbours", -1, "max_neighbours"),
                                               ("inverse_encoding_weight", -1.0, "inverse_encoding_weight")])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**TINY, field: value})


def test_the_loss_keeps_the_training_normalisation_in_the_model_and_its_checkpoint(tmp_path):
    """The family's items carry the training normalisation and its loss copies it into the
    model's buffers, so a checkpoint carries its own units; a state dict from before those
    buffers existed still loads (strictly), leaving them unset."""
    from shipyard.train.data import collate
    from shipyard_models.upt import DataConfig, load_flows, normalisation_of
    data = DataConfig(grid=8, train_trajectories=3, val_trajectories=1, snapshots=2, dt=0.25, max_mode=2,
                      input_points=16, output_points=8, supernodes=4)
    cfg = Config(**{**TINY, "n_params": 2})
    train, val = FAMILY.datasets(cfg, data, tmp_path)
    model = FAMILY.build(cfg)
    assert normalisation_of(model) is None  # nothing seen yet
    FAMILY.loss(model, collate([train[0], train[len(train) - 1]]), 0, 1)
    want, got = load_flows(data, tmp_path)[2], normalisation_of(model)
    assert got.scale == pytest.approx(want.scale, rel=1e-6)
    assert got.param_mean == pytest.approx(want.param_mean, rel=1e-6)
    assert got.param_std == pytest.approx(want.param_std, rel=1e-6)
    FAMILY.evaluate(model, collate([val[0]]))  # validation items carry the training statistics too
    assert normalisation_of(model) == got
    fresh = FAMILY.build(cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert normalisation_of(fresh) == got
    legacy = {k: v for k, v in model.state_dict().items() if k not in UPT.NORMALISATION}
    old = FAMILY.build(cfg)
    old.load_state_dict(legacy, strict=True)
    assert normalisation_of(old) is None
