"""Checkpoint loading never runs code from a file: the engines' pickled metadata goes through allow-lists."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shipyard.train.parallelize import _SafeFileSystemReader


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_genuine_dcp_metadata_reads(tmp_path):
    dcp.save({"w": torch.randn(3, 4), "step": 7}, checkpoint_id=str(tmp_path))
    meta = _SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert "w" in meta.state_dict_metadata


def test_dcp_metadata_with_a_foreign_class_is_refused(tmp_path):
    dcp.save({"w": torch.randn(2)}, checkpoint_id=str(tmp_path))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        _SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_deepspeed_checkpoint_engine_loads_tensors_and_refuses_code(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from shipyard.train.parallelize import _safe_checkpoint_engine
    engine = _safe_checkpoint_engine(TorchCheckpointEngine())
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "zero_stage": ZeroStageEnum.gradients, "ds_version": "0.19.8"}, good)
    assert engine.load(str(good))["w"].sum() == 2
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"x": Exploit()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(bad))
