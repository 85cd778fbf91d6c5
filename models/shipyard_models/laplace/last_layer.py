"""Last-layer Laplace approximations of a softmax classifier: identity curvature (ICLA), diagonal,
KFAC and full GGN; prior precision by marginal likelihood or validation NLL; probit and Monte Carlo
predictives.

Papers: "Identity Curvature Laplace Approximation for Improved Out-of-Distribution Detection"
(Zhdanov, Dereka, Kolesnikov, WACV 2025, arXiv:2312.10464) and, for the classic variants,
"Laplace Redux" (Daxberger et al., NeurIPS 2021) whose `laplace-torch` library the formulas follow.

Only the last layer is Bayesian: logits f = W phi(x) + b with the features phi frozen at the MAP.
Its parameters are theta = vec([W | b]) row-major, so theta[c * (D + 1) + d] is W_aug[c, d] with
phi augmented by a constant 1 for the bias. For the softmax likelihood the logits are linear in
theta, so the GGN equals the exact Hessian of the summed cross-entropy:

    H = sum_n Lambda_n (x) phi_n phi_n^T,        Lambda_n = diag(p_n) - p_n p_n^T.

* full:     H itself (P x P, P = C (D + 1)); posterior precision H + delta I.
* diag:     the exact diagonal of H.
* kfac:     H ~ G (x) A with G = sum_n Lambda_n and A = (1/N) sum_n phi_n phi_n^T (exact for N = 1);
            the prior is added in the eigenbasis, (Q_G (x) Q_A)(diag(g a^T) + delta)(Q_G (x) Q_A)^T,
            as laplace-torch does.
* identity: ICLA. The curvature is dropped: posterior covariance = I / delta, so the logit covariance
            of an input is (|phi_aug|^2 / delta) I_C and the uncertainty grows with the feature norm.

Prior precision delta:
* `marglik`: the Laplace evidence
      log Z(delta) = log p(D | theta*) - delta/2 |theta*|^2 + P/2 log delta - 1/2 log det(H + delta I)
  maximised by MacKay's fixed point delta = gamma / |theta*|^2, gamma = sum_i lambda_i / (lambda_i + delta)
  (the exact stationarity condition; laplace-torch runs Adam on log delta towards the same optimum).
  With zero curvature every lambda_i = 0, log Z = log p(D | theta*) - delta/2 |theta*|^2 has no finite
  optimum (it rises as delta -> 0), and `tune_marglik` refuses it.
* `val`: the delta on a log grid whose predictive has the lowest NLL on held-out data.

ICLA's prior precision, the two variants of the reference code:
* `icla_prior = "kfac" | "diag" | "full"`: tune delta *with* that curvature (by marglik, or on
  validation with that curvature's predictive), then drop the curvature.
* `icla_prior = "val"`: curvature-free from the start. Since the evidence of the curvature-free model
  has no finite optimum (above), we choose the validation NLL of ICLA's own predictive: with the
  identity curvature delta is the only free quantity of the posterior, a single scalar that sets the
  predictive's temperature-like spread, and held-out likelihood is the proper score that measures it
  (the same criterion as laplace-torch's `gridsearch`). The closed form delta = P / |theta*|^2 (ML-II
  on the weights alone) was rejected: it ignores the data and depends only on the weight norm.

Deviations: no temperature and no regression likelihood; a scalar (isotropic) prior only; the KFAC
factors are computed in closed form from the features (laplace-torch's curvlinops backend gives the
same G and the same 1/N-scaled A). KFAC and the bias: we fold the bias into A (features augmented by
1), so KFAC couples weights and bias; laplace-torch gives the bias its own block G with no
weight-bias cross curvature. With the bias folded into a bias-free head over [phi, 1] the two agree
exactly (tests/models/laplace/test_laplace_reference_parity.py). The grid for `val` is log-uniform,
not laplace-torch's default list.

Legend: N samples, D feature dim (with the bias 1), C classes, P = C * D parameters, S MC samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["identity", "diag", "kfac", "full"]
METHODS: tuple[str, ...] = ("identity", "diag", "kfac", "full")


def augment(phi_ND: torch.Tensor) -> torch.Tensor:
    """Features with a trailing 1 for the bias."""
    return torch.cat([phi_ND, phi_ND.new_ones(phi_ND.shape[0], 1)], dim=1)


def softmax_hessians(logits_NC: torch.Tensor) -> torch.Tensor:
    """Lambda_n = diag(p_n) - p_n p_n^T, the Hessian of -log softmax(f)_y in f (independent of y)."""
    p_NC = logits_NC.softmax(-1)
    return torch.diag_embed(p_NC) - p_NC[:, :, None] * p_NC[:, None, :]


def ggn_full(phi_ND: torch.Tensor, logits_NC: torch.Tensor) -> torch.Tensor:
    """sum_n Lambda_n (x) phi_n phi_n^T as a dense P x P matrix (phi already augmented).

    With Lambda_n = diag(p_n) - p_n p_n^T: a block diagonal (blocks sum_n p_nc phi_n phi_n^T) minus
    U^T U with rows U_n = p_n (x) phi_n, one matrix product instead of an N-fold sum of Kroneckers.
    """
    p_NC = logits_NC.softmax(-1)
    N, D = phi_ND.shape
    C = p_NC.shape[1]
    U = (p_NC[:, :, None] * phi_ND[:, None, :]).reshape(N, C * D)
    H = -(U.T @ U)
    for c in range(C):
        H[c * D:(c + 1) * D, c * D:(c + 1) * D] += (phi_ND * p_NC[:, c:c + 1]).T @ phi_ND
    return H


def ggn_diag(phi_ND: torch.Tensor, logits_NC: torch.Tensor) -> torch.Tensor:
    """The diagonal of `ggn_full`, [P]."""
    p_NC = logits_NC.softmax(-1)
    return torch.einsum("nc,nd->cd", p_NC * (1 - p_NC), phi_ND ** 2).reshape(-1)


def kfac_factors(phi_ND: torch.Tensor, logits_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [C, C], A [D, D]) with G (x) A ~ `ggn_full`; exact for a single sample."""
    G_CC = softmax_hessians(logits_NC).sum(0)
    A_DD = phi_ND.T @ phi_ND / phi_ND.shape[0]
    return G_CC, A_DD


@dataclass
class Posterior:
    """A Gaussian over the last layer, N(W_aug, Sigma), with Sigma stored per method.

    Args:
        method: identity | diag | kfac | full.
        W_CD: MAP weights with the bias as the last column.
        prior_precision: delta.
        curvature: full: H [P, P]; diag: its diagonal [P]; kfac: (G, A); identity: None.

    full and kfac are eigendecomposed once (H = V diag(lam) V^T; G and A each), so a new prior
    precision costs no new factorisation: Sigma = V diag(1 / (lam + delta)) V^T.
    """

    method: str
    W_CD: torch.Tensor
    prior_precision: float
    curvature: object = None

    def __post_init__(self) -> None:
        self._eig = None

    @property
    def num_params(self) -> int:
        return self.W_CD.numel()

    def decompose(self):
        """The eigendecomposition (cached): full (lam [P], V [P, P]); kfac ((g, QG), (a, QA))."""
        if self._eig is None:
            if self.method == "full":
                self._eig = torch.linalg.eigh(self.curvature)
            elif self.method == "kfac":
                self._eig = tuple(torch.linalg.eigh(m) for m in self.curvature)
        return self._eig

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the curvature [P] (zeros for ICLA)."""
        if self.method == "identity":
            return self.W_CD.new_zeros(self.num_params)
        if self.method == "diag":
            return self.curvature
        if self.method == "kfac":
            (g, _), (a, _) = self.decompose()
            return torch.outer(g, a).reshape(-1)
        return self.decompose()[0]

    def _inverse_eigenvalues(self) -> torch.Tensor:
        """1 / (lam + delta) in the eigenbasis (negative rounding of a PSD curvature clamped to 0)."""
        return 1.0 / (self.eigenvalues().clamp_min(0) + self.prior_precision)

    def covariance(self) -> torch.Tensor:
        """Dense Sigma [P, P] (for tests and small heads)."""
        P, delta = self.num_params, self.prior_precision
        if self.method == "identity":
            return torch.eye(P, dtype=self.W_CD.dtype) / delta
        if self.method == "diag":
            return torch.diag(1.0 / (self.curvature + delta))
        if self.method == "full":
            V = self.decompose()[1]
        else:
            (_, QG), (_, QA) = self.decompose()
            V = torch.kron(QG, QA)
        return (V * self._inverse_eigenvalues()) @ V.T

    def variance_at(self, phi_ND: torch.Tensor):
        """(mean logits [N, C], delta -> logit variances [N, C]): the work that does not depend on
        the prior precision done once, so tuning it on a grid is cheap for every method."""
        x_ND = augment(phi_ND.to(self.W_CD.dtype))
        f_NC = x_ND @ self.W_CD.T
        C, D = self.W_CD.shape
        lam = self.eigenvalues().clamp_min(0)
        if self.method == "identity":
            sq_N1 = (x_ND ** 2).sum(1, keepdim=True)
            return f_NC, lambda delta: (sq_N1 / delta).expand(-1, C)
        if self.method == "diag":
            sq_ND = x_ND ** 2
            return f_NC, lambda delta: sq_ND @ (1.0 / (lam + delta)).reshape(C, D).T
        if self.method == "kfac":
            (_, QG), (_, QA) = self.decompose()
            sq_ND, QG2_CC = (x_ND @ QA) ** 2, QG ** 2
            return f_NC, lambda delta: (sq_ND @ (1.0 / (lam + delta)).reshape(C, D).T) @ QG2_CC.T
        V_CDP = self.decompose()[1].reshape(C, D, -1)
        B2_NCP = torch.einsum("nd,cdp->ncp", x_ND, V_CDP) ** 2  # (J_n V)^2
        return f_NC, lambda delta: B2_NCP @ (1.0 / (lam + delta))

    def logit_mean_cov(self, phi_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [N, C] and covariance [N, C, C] of the logits under the posterior (phi not augmented)."""
        x_ND = augment(phi_ND.to(self.W_CD.dtype))
        f_NC = x_ND @ self.W_CD.T
        C, D = self.W_CD.shape
        inv_P = self._inverse_eigenvalues()
        if self.method in ("identity", "diag"):
            return f_NC, torch.diag_embed(self.variance_at(phi_ND)[1](self.prior_precision))
        if self.method == "kfac":
            (_, QG), (_, QA) = self.decompose()
            m_NC = ((x_ND @ QA) ** 2) @ inv_P.reshape(C, D).T  # per eigen-direction of G
            return f_NC, torch.einsum("ci,ni,di->ncd", QG, m_NC, QG)
        B_NCP = torch.einsum("nd,cdp->ncp", x_ND, self.decompose()[1].reshape(C, D, -1))
        return f_NC, torch.einsum("ncp,p,nep->nce", B_NCP, inv_P, B_NCP)

    def predict(self, phi_ND: torch.Tensor, how: Literal["probit", "mc"] = "probit",
                samples: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
        """Predictive class probabilities [N, C]."""
        if how == "probit":
            f_NC, var_at = self.variance_at(phi_ND)
            return probit(f_NC, var_at(self.prior_precision))
        if how == "mc":
            return monte_carlo(*self.logit_mean_cov(phi_ND), samples, generator)
        raise ValueError(f"predictive: {how!r} is not known; choose 'probit' or 'mc'")


def probit(f_NC: torch.Tensor, var_NC: torch.Tensor) -> torch.Tensor:
    """The multiclass probit approximation: softmax(f_c / sqrt(1 + pi/8 Var f_c))."""
    return (f_NC / torch.sqrt(1 + math.pi / 8 * var_NC)).softmax(-1)


def monte_carlo(f_NC: torch.Tensor, cov_NCC: torch.Tensor, samples: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """E[softmax(f)] for f ~ N(f_NC, cov_NCC), averaged over `samples` draws."""
    if samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {samples}")
    # A symmetric square root by eigh: the covariance is PSD but may be singular (ICLA is not).
    e_NC, V_NCC = torch.linalg.eigh(cov_NCC)
    root_NCC = V_NCC * e_NC.clamp_min(0).sqrt()[:, None, :]
    total_NC = torch.zeros_like(f_NC)
    for start in range(0, samples, 256):  # chunks bound the memory at 256 x N x C
        eps_SNC = torch.randn(min(256, samples - start), *f_NC.shape, dtype=f_NC.dtype, generator=generator)
        total_NC += (f_NC + torch.einsum("nij,snj->sni", root_NCC, eps_SNC)).softmax(-1).sum(0)
    return total_NC / samples


# -- fitting and the prior precision --

def fit(method: str, phi_ND: torch.Tensor, W_CD: torch.Tensor, b_C: torch.Tensor,
        prior_precision: float = 1.0) -> Posterior:
    """The curvature of `method` at the MAP head (W, b) on the training features phi (not augmented)."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not known; choose one of {', '.join(METHODS)}")
    dtype = torch.float64
    W_aug = torch.cat([W_CD.to(dtype), b_C.to(dtype)[:, None]], dim=1).detach()
    x_ND = augment(phi_ND.to(dtype))
    logits_NC = x_ND @ W_aug.T
    curvature = {"identity": lambda: None, "diag": lambda: ggn_diag(x_ND, logits_NC),
                 "kfac": lambda: kfac_factors(x_ND, logits_NC),
                 "full": lambda: ggn_full(x_ND, logits_NC)}[method]()
    return Posterior(method, W_aug, float(prior_precision), curvature)


def log_marglik(post: Posterior, log_lik: float, prior_precision: torch.Tensor,
                eigenvalues: torch.Tensor | None = None) -> torch.Tensor:
    """The Laplace evidence log Z(delta) (differentiable in `prior_precision`)."""
    lam = post.eigenvalues() if eigenvalues is None else eigenvalues
    lam = lam.clamp_min(0).to(prior_precision.dtype)
    theta_sq = (post.W_CD ** 2).sum().to(prior_precision.dtype)
    log_det_ratio = torch.log1p(lam / prior_precision).sum()  # log det(H + dI) - P log d
    return log_lik - 0.5 * prior_precision * theta_sq - 0.5 * log_det_ratio


def tune_marglik(post: Posterior, max_iter: int = 10_000, rtol: float = 1e-10) -> float:
    """delta maximising log Z by MacKay's fixed point; sets and returns it.

    Raises ValueError for a curvature with no positive eigenvalue (ICLA): its evidence only rises
    as delta falls to 0, so there is nothing finite to return (see the module docstring).
    """
    lam = post.eigenvalues().clamp_min(0)
    if not bool((lam > 0).any()):
        raise ValueError(f"prior precision by marglik: the {post.method} curvature has no positive "
                         "eigenvalue, so the marginal likelihood has no finite optimum (it grows as "
                         "the prior precision falls to 0); use prior 'val' instead")
    theta_sq = float((post.W_CD ** 2).sum())
    delta = 1.0
    for _ in range(max_iter):
        gamma = float((lam / (lam + delta)).sum())
        new = gamma / theta_sq
        if abs(new - delta) <= rtol * delta:
            delta = new
            break
        delta = new
    post.prior_precision = delta
    return delta


def default_grid() -> torch.Tensor:
    """Candidate prior precisions for `tune_val`: 81 points, log-uniform over 1e-4 .. 1e4."""
    return torch.logspace(-4, 4, 81, dtype=torch.float64)


def tune_val(post: Posterior, phi_ND: torch.Tensor, y_N: torch.Tensor,
             grid: torch.Tensor | None = None) -> float:
    """delta on `grid` whose probit predictive has the lowest NLL on (phi, y); sets and returns it."""
    grid = default_grid() if grid is None else grid
    f_NC, var_at = post.variance_at(phi_ND)
    best, best_nll = None, math.inf
    for delta in grid.tolist():
        p_NC = probit(f_NC, var_at(delta))
        nll = float(F.nll_loss(p_NC.clamp_min(1e-300).log(), y_N))
        if nll < best_nll:
            best, best_nll = delta, nll
    post.prior_precision = best
    return best


def log_likelihood(post: Posterior, phi_ND: torch.Tensor, y_N: torch.Tensor) -> float:
    """log p(D | theta*), summed over the data."""
    logits = augment(phi_ND.to(post.W_CD.dtype)) @ post.W_CD.T
    return -float(F.cross_entropy(logits, y_N, reduction="sum"))
