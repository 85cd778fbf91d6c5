"""Last-layer Laplace against brute force: the GGN by explicit Jacobians and autograd Hessians, KFAC's
factors and its exact cases, each posterior's covariance and logit covariance, ICLA's prior-scaled
identity, and the marginal likelihood (stationary for a curvature, no finite optimum without one).

Everything runs in float64 on a random head (N=7 samples, D=3 features, C=4 classes, P=16), so the
comparisons are exact up to rounding: rtol 1e-10.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shipyard_models.laplace import last_layer

N, D, C = 7, 3, 4
TOL = dict(rtol=1e-10, atol=1e-12)



@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return phi, W, b, y


def theta_of(W, b):
    return torch.cat([W, b[:, None]], 1).reshape(-1)


def logits_of(theta, phi):
    return last_layer.augment(phi) @ theta.reshape(C, D + 1).T


def brute_force_ggn(phi, W, b):
    """sum_n J_n^T H_n J_n with J_n = d logits_n / d theta (autograd) and H_n = d^2 CE / d logits^2."""
    theta = theta_of(W, b)
    total = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for n in range(len(phi)):
        J = torch.autograd.functional.jacobian(lambda t: logits_of(t, phi[n:n + 1])[0], theta)
        f = logits_of(theta, phi[n:n + 1])[0]
        H = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z[None], torch.tensor([0])), f)
        total += J.T @ H @ J
    return total, theta


def brute_force_jacobian(phi, W, b):
    return torch.stack([torch.autograd.functional.jacobian(lambda t: logits_of(t, phi[n:n + 1])[0],
                                                           theta_of(W, b)) for n in range(len(phi))])


def test_full_ggn_equals_explicit_jacobians_and_the_exact_hessian(problem):
    phi, W, b, y = problem
    ggn, theta = brute_force_ggn(phi, W, b)
    ours = last_layer.fit("full", phi, W, b).curvature
    torch.testing.assert_close(ours, ggn, **TOL)
    # The logits are linear in the last layer, so its GGN is the true Hessian of the summed loss.
    hessian = torch.autograd.functional.hessian(
        lambda t: F.cross_entropy(logits_of(t, phi), y, reduction="sum"), theta)
    torch.testing.assert_close(ours, hessian, **TOL)


def test_diag_is_the_diagonal_of_the_ggn(problem):
    phi, W, b, _ = problem
    ggn, _ = brute_force_ggn(phi, W, b)
    torch.testing.assert_close(last_layer.fit("diag", phi, W, b).curvature, torch.diagonal(ggn), **TOL)


def test_kfac_factors_and_its_exact_cases(problem):
    phi, W, b, _ = problem
    G, A = last_layer.fit("kfac", phi, W, b).curvature
    x = last_layer.augment(phi)
    p = (x @ theta_of(W, b).reshape(C, D + 1).T).softmax(-1)
    torch.testing.assert_close(G, sum(torch.diag(p[n]) - torch.outer(p[n], p[n]) for n in range(N)), **TOL)
    torch.testing.assert_close(A, x.T @ x / N, **TOL)
    # One sample: KFAC is the GGN exactly.
    G1, A1 = last_layer.fit("kfac", phi[:1], W, b).curvature
    torch.testing.assert_close(torch.kron(G1, A1), brute_force_ggn(phi[:1], W, b)[0], **TOL)
    # Equal softmax Hessians for every sample (a zero head: uniform p): exact for N samples too.
    Gz, Az = last_layer.fit("kfac", phi, torch.zeros_like(W), torch.zeros_like(b)).curvature
    full_z = brute_force_ggn(phi, torch.zeros_like(W), torch.zeros_like(b))[0]
    torch.testing.assert_close(torch.kron(Gz, Az), full_z, **TOL)
    # ...but not in general (the test above would not pass by accident).
    assert not torch.allclose(torch.kron(G, A), brute_force_ggn(phi, W, b)[0], rtol=1e-3)


@pytest.mark.parametrize("method", ["identity", "diag", "kfac", "full"])
def test_posterior_and_logit_covariance_match_dense_algebra(problem, method):
    phi, W, b, _ = problem
    delta = 0.7
    post = last_layer.fit(method, phi, W, b, prior_precision=delta)
    ggn, _ = brute_force_ggn(phi, W, b)
    P = C * (D + 1)
    eye = torch.eye(P, dtype=torch.float64)
    if method == "identity":
        H = torch.zeros(P, P, dtype=torch.float64)
    elif method == "diag":
        H = torch.diag(torch.diagonal(ggn))
    elif method == "kfac":
        H = torch.kron(*post.curvature)
    else:
        H = ggn
    sigma = torch.linalg.inv(H + delta * eye)
    torch.testing.assert_close(post.covariance(), sigma, **TOL)
    J = brute_force_jacobian(phi, W, b)  # [N, C, P]
    mean, cov = post.logit_mean_cov(phi)
    torch.testing.assert_close(mean, logits_of(theta_of(W, b), phi), **TOL)
    torch.testing.assert_close(cov, J @ sigma @ J.transpose(1, 2), **TOL)
    _, var_at = post.variance_at(phi)  # the probit's (and the grid search's) fast path
    torch.testing.assert_close(var_at(delta), torch.diagonal(J @ sigma @ J.transpose(1, 2), dim1=1, dim2=2), **TOL)


def test_icla_covariance_is_exactly_prior_scaled_identity(problem):
    phi, W, b, y = problem
    for delta in (0.3, 1.0, 17.0):
        post = last_layer.fit("identity", phi, W, b, prior_precision=delta)
        P = C * (D + 1)
        assert torch.equal(post.covariance(), torch.eye(P, dtype=torch.float64) / delta)
        _, cov = post.logit_mean_cov(phi)
        norms = (last_layer.augment(phi) ** 2).sum(1)
        torch.testing.assert_close(cov, norms[:, None, None] / delta * torch.eye(C, dtype=torch.float64), **TOL)
    # Both reference-code variants end in the same form: the prior precision is all that differs.
    tuned = last_layer.fit("identity", phi, W, b)
    delta = last_layer.tune_val(tuned, phi, y)
    assert torch.equal(tuned.covariance(), torch.eye(C * (D + 1), dtype=torch.float64) / delta)
    donor = last_layer.fit("kfac", phi, W, b)
    borrowed = last_layer.fit("identity", phi, W, b, prior_precision=last_layer.tune_marglik(donor))
    assert torch.equal(borrowed.covariance(), torch.eye(C * (D + 1), dtype=torch.float64) / donor.prior_precision)


@pytest.mark.parametrize("method", ["diag", "kfac", "full"])
def test_marglik_matches_the_dense_formula_and_its_optimum_is_stationary(problem, method):
    phi, W, b, y = problem
    post = last_layer.fit(method, phi, W, b)
    log_lik = last_layer.log_likelihood(post, phi, y)
    theta = theta_of(W, b)
    P = len(theta)
    eigs = post.eigenvalues()
    H = torch.diag(eigs)  # any matrix with these eigenvalues has this log det
    for delta in (0.1, 2.0):
        dense = (log_lik - 0.5 * delta * theta @ theta + 0.5 * P * math.log(delta)
                 - 0.5 * torch.logdet(H + delta * torch.eye(P, dtype=torch.float64)))
        ours = last_layer.log_marglik(post, log_lik, torch.tensor(delta, dtype=torch.float64))
        torch.testing.assert_close(ours, dense, **TOL)
    best = last_layer.tune_marglik(post)
    log_delta = torch.tensor(math.log(best), dtype=torch.float64, requires_grad=True)
    value = last_layer.log_marglik(post, log_lik, log_delta.exp())
    (grad,) = torch.autograd.grad(value, log_delta)
    assert abs(float(grad)) < 1e-8 * P  # the fixed point is a stationary point of log Z in log delta
    for factor in (0.5, 2.0):
        other = last_layer.log_marglik(post, log_lik, torch.tensor(best * factor, dtype=torch.float64))
        assert other < value


def test_curvature_free_marglik_has_no_finite_optimum(problem):
    """With zero curvature log Z = log p(D|theta) - delta/2 |theta|^2: the reference code's optimiser
    (Adam on log delta) lowers delta with every further step, and `tune_marglik` refuses it."""
    phi, W, b, y = problem
    post = last_layer.fit("identity", phi, W, b)
    log_lik = last_layer.log_likelihood(post, phi, y)
    log_delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_delta], lr=0.1)
    trace = []
    for step in range(1, 201):
        opt.zero_grad()
        (-last_layer.log_marglik(post, log_lik, log_delta.exp())).backward()
        opt.step()
        if step in (25, 50, 100, 200):
            delta = log_delta.detach().exp()
            trace.append((float(delta), float(last_layer.log_marglik(post, log_lik, delta))))
    deltas, values = zip(*trace)
    assert all(a > b for a, b in zip(deltas, deltas[1:])), deltas
    assert all(a < b for a, b in zip(values, values[1:])), values
    # and analytically: d log Z / d delta = -|theta|^2 / 2 < 0 at every delta
    grid = torch.logspace(-8, 4, 13, dtype=torch.float64).requires_grad_()
    values = torch.stack([last_layer.log_marglik(post, log_lik, d) for d in grid])
    (slopes,) = torch.autograd.grad(values.sum(), grid)
    torch.testing.assert_close(slopes, torch.full_like(slopes, -0.5 * float((theta_of(W, b) ** 2).sum())), **TOL)
    with pytest.raises(ValueError, match="no finite optimum"):
        last_layer.tune_marglik(post)


def test_bad_method_names_the_choices(problem):
    phi, W, b, _ = problem
    with pytest.raises(ValueError, match="identity, diag, kfac, full"):
        last_layer.fit("lowrank", phi, W, b)
