"""Matformer trains through the platform: `jobs/matformer/emt-formation.yaml`, shrunk, runs on
2 DDP workers (real Ray, gloo, real MLflow), its checkpoint holds the training split's target
statistics, and the trained model beats the untrained one (same seed) on the validation set.

The paper-level claim (MAE below 0.3 of the target's std on ~1000 structures) needs minutes of
CPU; it is measured by `benchmarks/matformer.py` (figure `mae_over_target_std`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shipyard.spec import load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.data import collate
from shipyard.train.launch import run_job
from shipyard_models.matformer import FAMILY, DataConfig

JOB = Path(__file__).resolve().parents[3] / "jobs" / "matformer" / "emt-formation.yaml"
TINY = ["model.hidden=16", "model.layers=2", "model.heads=1", "model.fc_hidden=16", "model.rbf_bins=32",
        "data.num_structures=48", "data.max_atoms=8", "data.val_fraction=0.25", "train.steps=24",
        "train.batch_size=8", "train.lr=5.0e-3", "train.warmup_steps=0", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.log_every=8",
        "tracking.experiment=matformer-test", "checkpoint.best_metric=null"]


@pytest.mark.slow
def test_emt_formation_job_trains_through_the_platform(ray_cluster, shipyard_home):
    spec = load_job(JOB, TINY)
    result = run_job(spec, quiet=True)
    assert result.status == "FINISHED", result.error
    assert {"val/mae", "val/mae_over_std", "train/loss"} <= set(result.metrics)

    torch.manual_seed(spec.train.seed)
    untrained = FAMILY.build(spec.model)
    trained = FAMILY.build(spec.model)
    trained.load_state_dict(ckpt.load_weights(result.checkpoint))
    train, val = FAMILY.datasets(spec.model, spec.data, Path(shipyard_home) / "data")
    assert trained.target_mean.item() == pytest.approx(train.y_mean)  # statistics in the weights
    assert trained.target_std.item() == pytest.approx(train.y_std)

    batch = collate([val[i] for i in range(len(val))])
    untrained.eval(), trained.eval()
    with torch.no_grad():
        before = FAMILY.evaluate(untrained, batch)["mae"].item()
        after = FAMILY.evaluate(trained, batch)["mae"].item()
    print(f"val MAE: untrained {before:.4f}, after {spec.train.steps} steps {after:.4f} eV/atom")
    # an untrained head is several target stds off (0.33 vs 0.05 eV/atom measured); 24 steps
    # bring it to the targets' scale, so half the untrained error is a margin, not a tuning
    assert after < 0.5 * before


def test_bad_data_config_names_the_field():
    with pytest.raises(ValueError, match="target_key"):
        DataConfig(target_key="band_gap")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="elements"):
        DataConfig(elements=["Cu", "Fe"])
