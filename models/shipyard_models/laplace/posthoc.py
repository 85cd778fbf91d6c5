"""Fit every requested last-layer Laplace variant on a trained classifier and score it.

`run(model, splits, cfg)` is what the platform's `laplace:` stage and benchmarks/laplace_ood.py
call: features are computed once with the trained network, each method is fitted on the training
features (timed: curvature plus prior-precision tuning), and its predictive is scored on the
in-distribution test split (accuracy, NLL, ECE, reliability bins) and on each OOD set (AUROC,
FPR95 of the maximum predictive probability). `map` is the plain network, the baseline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from . import last_layer, metrics
from .digits import Splits

LaplaceMethod = Literal["icla", "diag", "kfac", "full"]
CURVATURE = {"icla": "identity", "diag": "diag", "kfac": "kfac", "full": "full"}


@dataclass
class LaplaceConfig:
    """How the Laplace stage fits and predicts.

    Args:
        methods: which last-layer posteriors to fit (the MAP network is always scored too).
        prior: how diag / kfac / full tune the prior precision: `marglik` or `val` (validation NLL).
        icla_prior: ICLA's prior precision: `val` = curvature-free from the start (validation NLL,
            see last_layer's docstring for why), or a curvature (`kfac`, `diag`, `full`): the prior
            precision that method gets (tuned as `prior` says), after which the curvature is dropped
            (the other reference-code variant).
        predictive: `probit` or `mc` (Monte Carlo with `mc_samples` draws, seeded by `seed`).
    """

    methods: tuple[str, ...] = ("icla", "diag", "kfac", "full")
    prior: Literal["marglik", "val"] = "marglik"
    icla_prior: Literal["val", "diag", "kfac", "full"] = "val"
    predictive: Literal["probit", "mc"] = "probit"
    mc_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in CURVATURE]
        if bad or not self.methods:
            raise ValueError(f"methods: {bad or 'none'} not allowed; choose from {', '.join(CURVATURE)}")
        for name, allowed in (("prior", ("marglik", "val")), ("icla_prior", ("val", "diag", "kfac", "full")),
                              ("predictive", ("probit", "mc"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} not allowed; choose one of {', '.join(allowed)}")
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {self.mc_samples}")


@dataclass
class MethodResult:
    metrics: dict[str, float]
    """accuracy, nll, ece, auroc/<set>, fpr95/<set>, fit_s, prior_precision."""
    reliability: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def map_probabilities(head: nn.Linear, phi_ND: torch.Tensor) -> torch.Tensor:
    """The plain network's (MAP) class probabilities [N, C] from last-layer features."""
    W = torch.cat([head.weight, head.bias[:, None]], 1).detach().double()
    return (last_layer.augment(phi_ND) @ W.T).softmax(-1)


def fit_method(method: str, cfg: LaplaceConfig, head: nn.Linear, phi_train: torch.Tensor,
               y_train: torch.Tensor, phi_val: torch.Tensor, y_val: torch.Tensor) -> last_layer.Posterior:
    """One fitted posterior with its prior precision tuned as `cfg` says."""
    W, b = head.weight.detach(), head.bias.detach()
    if method == "icla":
        if cfg.icla_prior == "val":
            post = last_layer.fit("identity", phi_train, W, b)
            last_layer.tune_val(post, phi_val, y_val)
            return post
        donor = fit_method(cfg.icla_prior, cfg, head, phi_train, y_train, phi_val, y_val)
        return last_layer.fit("identity", phi_train, W, b, prior_precision=donor.prior_precision)
    post = last_layer.fit(CURVATURE[method], phi_train, W, b)
    if cfg.prior == "marglik":
        last_layer.tune_marglik(post)
    else:
        last_layer.tune_val(post, phi_val, y_val)
    return post


def score(p_test: torch.Tensor, y_test: torch.Tensor, p_ood: dict[str, torch.Tensor]) -> MethodResult:
    conf_in = p_test.max(-1).values
    out = {"accuracy": metrics.accuracy(p_test, y_test), "nll": metrics.nll(p_test, y_test),
           "ece": metrics.ece(p_test, y_test)}
    for name, p in p_ood.items():
        conf_out = p.max(-1).values
        out[f"auroc/{name}"] = metrics.auroc(conf_in, conf_out)
        out[f"fpr95/{name}"] = metrics.fpr_at_95_tpr(conf_in, conf_out)
    return MethodResult(out, metrics.reliability(p_test, y_test))


def run(model: nn.Module, splits: Splits, cfg: LaplaceConfig) -> dict[str, MethodResult]:
    """{"map": ..., method: ...} for every method in `cfg.methods`."""
    head = model.head
    phi = {k: features(model, v) for k, v in splits.x.items()}
    phi_ood = {k: features(model, v) for k, v in splits.ood.items()}
    y = splits.y

    def plain(p):
        return map_probabilities(head, p)

    results = {"map": score(plain(phi["test"]), y["test"], {k: plain(v) for k, v in phi_ood.items()})}
    for method in cfg.methods:
        start = time.perf_counter()
        post = fit_method(method, cfg, head, phi["train"], y["train"], phi["val"], y["val"])
        post.decompose()  # the factorisation is part of fitting, not of predicting
        fit_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(cfg.seed)

        def predict(p):
            return post.predict(p, cfg.predictive, cfg.mc_samples, gen)

        result = score(predict(phi["test"]), y["test"], {k: predict(v) for k, v in phi_ood.items()})
        result.metrics.update(fit_s=fit_s, prior_precision=post.prior_precision)
        results[method] = result
    return results
