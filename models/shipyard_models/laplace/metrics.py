"""Scores of a predictive distribution: accuracy, NLL, ECE, reliability bins, and OOD detection
by the maximum predictive probability (AUROC, FPR at 95% TPR).

Conventions (as OpenOOD, whose protocol the ICLA paper follows): in-distribution samples are the
positives and the score is the confidence max_c p_c. AUROC is the probability that a random
in-distribution sample scores above a random OOD one (ties count half). FPR95 is the share of OOD
samples accepted at the threshold that accepts 95% of the in-distribution samples.
"""
from __future__ import annotations

import math

import torch


def accuracy(p_NC: torch.Tensor, y_N: torch.Tensor) -> float:
    return float((p_NC.argmax(-1) == y_N).double().mean())


def nll(p_NC: torch.Tensor, y_N: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class (nats)."""
    return float(-p_NC.gather(1, y_N[:, None]).clamp_min(1e-300).log().mean())


def reliability(p_NC: torch.Tensor, y_N: torch.Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence, accuracy, count (empty bins are left out)."""
    conf_N, pred_N = p_NC.max(-1)
    correct_N = (pred_N == y_N).double()
    index_N = torch.clamp((conf_N * bins).long(), max=bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = index_N == b
        if mask.any():
            out["confidence"].append(float(conf_N[mask].double().mean()))
            out["accuracy"].append(float(correct_N[mask].mean()))
            out["count"].append(int(mask.sum()))
    return out


def ece(p_NC: torch.Tensor, y_N: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    r = reliability(p_NC, y_N, bins)
    n = sum(r["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]))


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """P(score_in > score_out) + P(tie) / 2 (the Mann-Whitney statistic)."""
    scores = torch.cat([score_in, score_out]).double()
    ranks = _average_ranks(scores)
    n_in, n_out = len(score_in), len(score_out)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def fpr_at_95_tpr(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Share of OOD samples scoring >= the threshold that keeps 95% of in-distribution ones."""
    ordered = torch.sort(score_in.double(), descending=True).values
    threshold = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return float((score_out.double() >= threshold).double().mean())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    return ((last - counts + 1 + last) / 2)[inverse]
