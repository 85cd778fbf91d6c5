"""`shipyard.export.save_model`: a model built in this process becomes a complete platform
checkpoint that the platform's own readers take, with or without a running process group."""
import os

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist

from shipyard.export import load_model, save_model
from shipyard.registry import MODELS
from shipyard.spec import parse_job
from shipyard.train import checkpoint as ckpt

SPEC = {"name": "notebook-minrnn",
        "model": {"family": "minrnn", "vocab_size": 64, "dim": 16, "depth": 2},
        "data": {"seq_len": 16}, "train": {"steps": 7, "batch_size": 2},
        "scaling": {"num_workers": 1}, "sharding": {"strategy": "fsdp"}}


def build():
    torch.manual_seed(0)
    spec = parse_job(SPEC)
    return MODELS["minrnn"].build(spec.model), spec


def test_a_saved_model_is_a_complete_checkpoint_the_readers_take(tmp_path):
    model, spec = build()
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    run_dir = tmp_path / "runs" / "notebook-minrnn"
    directory = save_model(model, SPEC, run_dir / ckpt.dir_name(7), step=7)
    assert not dist.is_initialized()  # its own one-process group is gone again
    assert {k: os.environ.get(k) for k in env_before} == env_before
    fs = pafs.LocalFileSystem()
    assert ckpt.read_manifest(fs, str(directory))["step"] == 7
    assert ckpt.latest_complete(fs, str(run_dir)) == str(directory)
    loaded, loaded_spec, meta = load_model(directory)
    assert (meta.step, meta.strategy, meta.world_size) == (7, "ddp", 1)  # DDP whatever the spec says
    assert loaded_spec.to_dict() == spec.to_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    save_model(model, spec, run_dir / ckpt.dir_name(8), step=8)  # again, in the same process
    assert ckpt.latest_complete(fs, str(run_dir)).endswith(ckpt.dir_name(8))


def test_inside_a_running_one_process_group_it_writes_and_leaves_the_group(tmp_path):
    model, spec = build()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        save_model(model, spec, tmp_path / "ckpt")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert ckpt.read_manifest(pafs.LocalFileSystem(), str(tmp_path / "ckpt")) is not None


def test_a_bad_spec_is_refused_before_anything_is_written(tmp_path):
    model, _ = build()
    with pytest.raises(Exception, match="dim"):
        save_model(model, {**SPEC, "model": {**SPEC["model"], "dim": "wide"}}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not dist.is_initialized()
