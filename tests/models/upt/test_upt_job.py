"""UPT through the platform: `jobs/upt/navier-stokes.yaml`, shrunk, trains on the real local Ray
cluster with 2 DDP workers, simulates its flows once into the Shipyard cache folder, and logs the
one-step and persistence errors; the family refuses a model that does not fit the data."""
from pathlib import Path

import pytest
import torch

from shipyard.registry import MODELS
from shipyard.spec import SpecError, load_job
from shipyard.train import checkpoint as ckpt
from shipyard.train.launch import run_job

JOB = Path(__file__).resolve().parents[3] / "jobs" / "upt" / "navier-stokes.yaml"
TINY = ["model.dim=16", "model.heads=2", "model.approximator_depth=1", "model.latent_tokens=4",
        "model.inverse_decoding_weight=0.5", "data.grid=16", "data.train_trajectories=2",
        "data.val_trajectories=1", "data.snapshots=4", "data.input_points=64", "data.output_points=32",
        "data.supernodes=8", "data.resamplings=1", "train.steps=3", "train.batch_size=4",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=0",
        "train.warmup_steps=0", "tracking.experiment=upt-test"]


@pytest.mark.slow
def test_tiny_navier_stokes_job_trains_through_the_platform(ray_cluster, shipyard_home):
    spec = load_job(JOB, TINY)
    records: list[dict] = []
    result = run_job(spec, on_record=records.append, quiet=True)
    assert result.status == "FINISHED"
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name in ("val/rel_l2", "val/persistence_rel_l2", "val/inverse_encoding", "val/inverse_decoding"):
        assert name in result.metrics and result.metrics[name] == result.metrics[name]  # present, not NaN
    assert list((shipyard_home / "data").glob("flows-navier-stokes-*.safetensors"))
    weights = ckpt.load_weights(result.checkpoint)
    assert any(k.startswith("approximator.blocks.0.modulation") for k in weights)


def test_bad_fields_are_refused_with_their_names(tmp_path):
    spec = load_job(JOB, [*TINY, "data.kind=advection-diffusion"])  # 3 parameters, the model has 2
    with pytest.raises(ValueError, match="model.n_params"):
        MODELS["upt"].datasets(spec.model, spec.data, tmp_path)
    for override, field in [("data.kind=burgers", "data.kind"), ("data.supernodes=100", "data"),
                            ("model.radius=0.9", "model"), ("data.every=0.07", "data")]:
        with pytest.raises(SpecError, match=field):
            load_job(JOB, [*TINY, override])
