"""Predictives and scores on a small trained digits MLP: Monte Carlo against exact quadrature, the
probit against Monte Carlo, the metrics against scikit-learn and hand-worked cases, and the whole
post-hoc run (every method, both ICLA variants)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shipyard_models.laplace import (Config, DataConfig, LaplaceConfig, build, last_layer, metrics,
                                     posthoc, splits, train_plain)

S = 10_000  # MC draws: standard error of a probability <= 0.5 / sqrt(S) = 0.005



@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg, data = Config(hidden=32), DataConfig(in_classes=[0, 1, 2, 3, 4])
    s = splits(cfg, data)
    model = train_plain(build(cfg), s.x["train"], s.y["train"], steps=200)
    return model, s


def test_monte_carlo_matches_exact_quadrature_in_the_two_class_case():
    """For two independent logits with variances v1, v2, E[softmax]_1 = E[sigmoid(z)], z ~ N(m1 - m2,
    v1 + v2): a 1-D integral done by 200-point Gauss-Hermite quadrature (exact to ~1e-12 here)."""
    f = torch.tensor([[1.3, -0.4], [0.2, 0.1], [-2.0, 1.5]], dtype=torch.float64)
    var = torch.tensor([[0.5, 2.0], [4.0, 1.0], [1.0, 9.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    mc = last_layer.monte_carlo(f, torch.diag_embed(var), 200_000, gen)[:, 0]
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    for n in range(len(f)):
        m, s = float(f[n, 0] - f[n, 1]), math.sqrt(float(var[n].sum()))
        p = 1 / (1 + np.exp(-(m + s * nodes)))
        exact = float((weights * p).sum() / math.sqrt(2 * math.pi))
        se = math.sqrt(exact * (1 - exact) / 200_000)  # a bound: Var sigmoid(z) <= p (1 - p)
        assert abs(float(mc[n]) - exact) < 5 * se, (n, float(mc[n]), exact)


def test_probit_matches_monte_carlo_at_the_fitted_posterior(trained):
    """The multiclass probit (softmax of f / sqrt(1 + pi/8 var)) is an approximation, exact only at zero
    variance, so the comparison has two parts. (1) As the posterior variance shrinks (delta up) the
    largest difference falls towards 0. (2) At ICLA's fitted prior precision (validation NLL) the two
    agree on what the stage reports: argmax, mean probability, AUROC. With S = 10k draws the MC
    standard error of one probability is <= 0.005 (far less near 0 or 1); the bounds (mean |diff| <
    0.01, AUROC within 0.01) are ~2.5x the measured approximation error (0.004 mean). At a large
    posterior variance the probit departs much further (up to 0.2 per probability), which is why the
    stage also offers `predictive: mc`."""
    model, s = trained
    phi_train = posthoc.features(model, s.x["train"])
    phi_val = posthoc.features(model, s.x["val"])
    phi_in, phi_out = posthoc.features(model, s.x["test"][:120]), posthoc.features(model, s.ood["near"][:120])
    post = last_layer.fit("identity", phi_train, model.head.weight, model.head.bias)

    gaps = []
    for delta in (1e2, 1e4, 1e6):
        post.prior_precision = delta
        gen = torch.Generator().manual_seed(0)  # the same draws for each delta
        gaps.append(float((post.predict(phi_in, "probit") - post.predict(phi_in, "mc", 1000, gen)).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps

    last_layer.tune_val(post, phi_val, s.y["val"])
    both = torch.cat([phi_in, phi_out])
    gen = torch.Generator().manual_seed(0)
    p_probit, p_mc = post.predict(both, "probit"), post.predict(both, "mc", S, gen)
    assert (p_probit.argmax(1) == p_mc.argmax(1)).double().mean() > 0.99
    assert (p_probit - p_mc).abs().mean() < 0.01
    n = len(phi_in)
    auroc_probit = metrics.auroc(p_probit[:n].max(1).values, p_probit[n:].max(1).values)
    auroc_mc = metrics.auroc(p_mc[:n].max(1).values, p_mc[n:].max(1).values)
    assert abs(auroc_probit - auroc_mc) < 0.01


def test_metrics_against_sklearn_and_hand_worked_cases():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(1)
    score_in = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    score_out = torch.randint(0, 15, (200,), generator=g).double()
    want = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[score_in.numpy(), score_out.numpy()])
    assert metrics.auroc(score_in, score_out) == pytest.approx(want, abs=1e-12)
    # 20 in-distribution scores 1..20: the 95% threshold keeps 19 of them, i.e. scores >= 2.
    assert metrics.fpr_at_95_tpr(torch.arange(1.0, 21.0), torch.tensor([1.0, 1.5, 2.0, 30.0])) == 0.5
    # Two bins: confidences 0.95 (all right) and 0.6 (half right): ECE = 0.5 * 0.05 + 0.5 * 0.1.
    p = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0])
    assert metrics.ece(p, y) == pytest.approx(0.075, abs=1e-12)
    assert metrics.nll(p, y) == pytest.approx(-(2 * math.log(0.95) + math.log(0.6) + math.log(0.4)) / 4)
    assert metrics.accuracy(p, y) == 0.75


def test_posthoc_run_fits_every_method_and_both_icla_variants(trained):
    model, s = trained
    free = posthoc.run(model, s, LaplaceConfig(icla_prior="val"))
    assert set(free) == {"map", "icla", "diag", "kfac", "full"}
    for name, r in free.items():
        assert r.metrics["accuracy"] > 0.9, name  # Laplace (probit) never flips many MAP decisions here
        for ood in s.ood:
            assert 0.0 <= r.metrics[f"auroc/{ood}"] <= 1.0
        assert sum(r.reliability["count"]) == len(s.y["test"])
    # Borrowed: ICLA takes KFAC's marginal-likelihood prior precision, then drops the curvature.
    borrowed = posthoc.run(model, s, LaplaceConfig(methods=("icla", "kfac"), icla_prior="kfac"))
    assert borrowed["icla"].metrics["prior_precision"] == borrowed["kfac"].metrics["prior_precision"]
    assert borrowed["icla"].metrics["prior_precision"] != free["icla"].metrics["prior_precision"]
    with pytest.raises(ValueError, match="methods"):
        LaplaceConfig(methods=("icla", "swag"))
    with pytest.raises(ValueError, match="icla_prior"):
        LaplaceConfig(icla_prior="marglik")
