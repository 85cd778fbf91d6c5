"""`/v1/classify`: a classifier's prediction with last-layer Laplace predictive uncertainty.

When a replica loads a classification checkpoint (a family with a Laplace task,
`shipyard.posthoc.laplace.TASKS`), `prepare` fits every posterior the checkpoint's `laplace:`
block lists (identity curvature first by default, then diag / KFAC / full GGN), each with its
prior precision tuned as that block says, on the training split the job trained on. The
in-distribution validation split then fixes each method's OOD threshold: the confidence (maximum
predictive probability) that 95% of validation inputs exceed, so `ood` flags an input the way the
stage's FPR95 metric counts it. Fitting is a last-layer computation (milliseconds to a second on
the digits task); the replica logs how long it took.

Request: {"inputs": [[x_1 .. x_D], ...]} (raw features, as the training data: for the digits
task 64 pixel values in [0, 1]), optional "method" (one of the fitted ones; default the first) and
"predictive" ("probit" or "mc", default the `laplace:` block's; "mc" draws "mc_samples" with "seed").

Response: per input the predicted `label` (the dataset's own label, e.g. the digit) and
`class_index`, Laplace `probabilities`, the plain network's `map_probabilities`, `confidence`,
`entropy` (nats), `ood_score` = 1 - confidence and `ood` = confidence below the threshold; and
the method, its prior precision and threshold. The numbers are the model's own: `predict` below is
what the tests compare against in-process.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from pydantic import Field

from .protocol import ApiError, Strict

log = logging.getLogger("shipyard.serve")

SUMMARY = "Classify inputs, with last-layer Laplace predictive uncertainty and an OOD flag"
MAX_INPUTS = 256
OOD_TPR = 0.95


class ClassifyRequest(Strict):
    """POST /v1/classify."""

    inputs: list[list[float]] = Field(
        min_length=1, max_length=MAX_INPUTS,
        description=f"1 .. {MAX_INPUTS} inputs, each the model's feature count of finite numbers")
    method: str | None = Field(None, description="a fitted posterior (/v1/models lists them); "
                                                 "default: the first fitted")
    predictive: str | None = Field(None, description="'probit' or 'mc'; default: the checkpoint's "
                                                     "laplace.predictive")
    mc_samples: int = Field(1000, ge=1, le=10000, description="Monte Carlo draws (predictive: mc), 1 .. 10000")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Monte Carlo seed, >= 0")
    model: str | None = Field(None, description="if given, the served model's id (/v1/models)")


@dataclass
class Fitted:
    posteriors: dict
    """method -> last_layer.Posterior."""
    thresholds: dict[str, float]
    """method -> confidence below which an input is flagged OOD."""
    labels: list[int]
    """class index -> the dataset's label."""
    predictive: str
    fit_s: dict[str, float]


def prepare(served) -> None:
    """Fit the posteriors the checkpoint's `laplace:` block lists (see the module docstring)."""
    from shipyard.posthoc.laplace import TASKS
    from shipyard_models.laplace import LaplaceConfig, posthoc
    spec = served.spec
    if spec.family not in TASKS:
        raise ValueError(f"family {spec.family!r} has no Laplace task; families with one: "
                         f"{', '.join(sorted(TASKS))}")
    cfg = LaplaceConfig(**{k: tuple(v) if k == "methods" else v
                           for k, v in dataclasses.asdict(spec.laplace).items() if k != "after_training"})
    splits = TASKS[spec.family](spec.model, spec.data)
    model = served.model
    phi = {k: posthoc.features(model, v) for k, v in splits.x.items()}
    posteriors, thresholds, fit_s = {}, {}, {}
    for method in cfg.methods:
        start = time.perf_counter()
        post = posthoc.fit_method(method, cfg, model.head, phi["train"], splits.y["train"],
                                  phi["val"], splits.y["val"])
        post.decompose()
        fit_s[method] = time.perf_counter() - start
        confidence = post.predict(phi["val"], "probit").max(-1).values
        posteriors[method] = post
        thresholds[method] = float(torch.quantile(confidence, 1 - OOD_TPR))
    labels = list(getattr(spec.data, "in_classes", range(spec.model.num_classes)))
    served.state["laplace"] = Fitted(posteriors, thresholds, labels, cfg.predictive, fit_s)
    log.info("Laplace posteriors fitted: %s", ", ".join(
        f"{m} ({1000 * s:.0f} ms, prior precision {posteriors[m].prior_precision:.3g})"
        for m, s in fit_s.items()))


def predict(model, fitted: Fitted, x_ND: torch.Tensor, method: str, how: str, samples: int = 1000,
            seed: int = 0) -> dict:
    """The response body's numbers for inputs x (what the endpoint returns, in-process)."""
    from shipyard_models.laplace import posthoc
    post = fitted.posteriors[method]
    phi = posthoc.features(model, x_ND)
    generator = torch.Generator().manual_seed(seed)
    p = post.predict(phi, how, samples, generator)
    p_map = posthoc.map_probabilities(model.head, phi)
    confidence, index = p.max(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    threshold = fitted.thresholds[method]
    return {"method": method, "predictive": how, "prior_precision": post.prior_precision,
            "ood_threshold": threshold,
            "predictions": [{"label": fitted.labels[int(i)], "class_index": int(i),
                             "probabilities": p[n].tolist(), "map_probabilities": p_map[n].tolist(),
                             "confidence": float(confidence[n]), "entropy": float(entropy[n]),
                             "ood_score": 1.0 - float(confidence[n]),
                             "ood": bool(confidence[n] < threshold)} for n, i in enumerate(index)]}


def classify(served, req: ClassifyRequest) -> dict:
    fitted: Fitted = served.state["laplace"]
    method = req.method or next(iter(fitted.posteriors))
    if method not in fitted.posteriors:
        raise ApiError(422, f"method: {method!r} is not fitted here; fitted: "
                            f"{', '.join(fitted.posteriors)}", "method")
    how = req.predictive or fitted.predictive
    if how not in ("probit", "mc"):
        raise ApiError(422, f"predictive: {how!r} is not allowed; choose 'probit' or 'mc'", "predictive")
    width = served.spec.model.in_dim
    bad = [i for i, row in enumerate(req.inputs) if len(row) != width]
    if bad:
        raise ApiError(422, f"inputs.{bad[0]}: {len(req.inputs[bad[0]])} numbers, but this model "
                            f"takes {width} features per input", "inputs")
    x = torch.tensor(req.inputs, dtype=torch.float32)
    with torch.no_grad():
        body = predict(served.model, fitted, x, method, how, req.mc_samples, req.seed)
    return {"object": "classification", "model": served.model_id, **body}


def describe(served) -> dict:
    """What /v1/models adds for a classifier: the fitted methods, their priors and thresholds."""
    fitted: Fitted = served.state["laplace"]
    return {m: {"prior_precision": p.prior_precision, "ood_threshold": fitted.thresholds[m],
                "fit_ms": 1000 * fitted.fit_s[m]} for m, p in fitted.posteriors.items()}
