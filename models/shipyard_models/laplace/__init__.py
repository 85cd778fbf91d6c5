"""Identity-curvature last-layer Laplace ("Identity Curvature Laplace Approximation for Improved
Out-of-Distribution Detection", Zhdanov, Dereka, Kolesnikov, WACV 2025, arXiv:2312.10464) and the
classic last-layer variants, with a small classifier family to fit them on: an MLP on scikit-learn's
bundled digits, some classes in-distribution, the rest (plus noise and rotated digits) OOD.

The platform trains the classifier through `FAMILY` like any family; the Laplace fit is a post-hoc
stage on a finished checkpoint (`posthoc.run`, driven by the job spec's `laplace:` block).
`last_layer.py` holds the approximations and lists every deviation from the paper and laplace-torch.

Deviations of the family seam: `datasets` returns the train and val splits of the in-distribution
classes; the test split and the OOD sets are only read by the Laplace stage (`digits.load`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..family import Batch, Family, Metrics
from . import digits, last_layer, metrics, posthoc
from .digits import OOD_SETS, Splits, Tensors
from .model import Config, MLPClassifier, train_plain
from .posthoc import LaplaceConfig, MethodResult

__all__ = ["FAMILY", "Config", "DataConfig", "MLPClassifier", "LaplaceConfig", "MethodResult", "Splits",
           "OOD_SETS", "splits", "train_plain", "last_layer", "metrics", "posthoc"]


@dataclass
class DataConfig:
    """The job spec's `data:` block: which digits are in-distribution, and the split seed."""

    in_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """In-distribution digits (relabelled 0..K-1 in this order); the others are the near-OOD set."""
    split_seed: int = 0
    """Seed of the train / val / test permutation (and of the noise OOD set)."""

    def __post_init__(self) -> None:
        digits.check_classes(self.in_classes)


def build(cfg: Config) -> nn.Module:
    return MLPClassifier(cfg)


def splits(cfg: Config, data_cfg: DataConfig) -> Splits:
    """All splits and OOD sets, after checking the head fits the classes."""
    if cfg.num_classes != len(data_cfg.in_classes):
        raise ValueError(f"model.num_classes ({cfg.num_classes}) must equal the number of "
                         f"data.in_classes ({len(data_cfg.in_classes)})")
    if cfg.in_dim != 64:
        raise ValueError(f"model.in_dim must be 64 for 8x8 digits, got {cfg.in_dim}")
    return digits.load(data_cfg.in_classes, data_cfg.split_seed)


def datasets(cfg: Config, data_cfg: DataConfig, cache_dir: Path):
    s = splits(cfg, data_cfg)
    return Tensors(s.x["train"], s.y["train"]), Tensors(s.x["val"], s.y["val"])


def _metrics(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == batch["y"]).float().mean()}


def loss(model: nn.Module, batch: Batch, step: int, total_steps: int):
    """Cross-entropy; no curriculum."""
    return _metrics(model, batch)


def evaluate(model: nn.Module, batch: Batch) -> Metrics:
    return _metrics(model, batch)[1]


def shard_units(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


def report(model: nn.Module, cfg: Config, data_cfg: DataConfig, cache_dir: Path) -> str:
    """Test accuracy and near-OOD AUROC of the network and of ICLA (probit, prior on validation)."""
    results = posthoc.run(model, splits(cfg, data_cfg), LaplaceConfig(methods=("icla",)))
    lines = [f"digits {data_cfg.in_classes} in-distribution, the others near-OOD"]
    for name, r in results.items():
        m = r.metrics
        lines.append(f"  {name:5s} accuracy {m['accuracy']:.3f}  NLL {m['nll']:.3f}  ECE {m['ece']:.3f}  "
                     + "  ".join(f"AUROC {s} {m['auroc/' + s]:.3f}" for s in OOD_SETS))
    return "\n".join(lines)


FAMILY = Family(
    name="laplace",
    Config=Config,
    DataConfig=DataConfig,
    build=build,
    datasets=datasets,
    loss=loss,
    evaluate=evaluate,
    shard_units=shard_units,
    report=report,
)
