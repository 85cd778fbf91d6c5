"""Sharding strategies, applied to a plain model from outside: ddp | fsdp | deepspeed.

Each strategy is a small engine with the same surface, so the training loop never branches on it:

    engine.model            call it like the model (it may be a wrapper)
    engine.backward(loss)
    engine.step(lr)         clip, optimizer step, zero grads; returns the global gradient norm
    engine.save(dir)        sharded resume state (collective; every rank writes its own files)
    engine.load(dir)
    engine.full_state_dict()  consolidated weights on rank 0 (collective), {} elsewhere

All three use AdamW with the same hyperparameters, and the learning rate is set from the step
before every update (`lr_at`), so the schedule carries no state beyond the step.
DDP and FSDP2 save through `torch.distributed.checkpoint` (which reshards on load); DeepSpeed
through its own engine. Neither engine's stock loader is safe on untrusted storage (DCP unpickles
its `.metadata`, DeepSpeed calls `torch.load(weights_only=False)`), so both are read here through
restricted unpicklers that admit only the engines' own plain metadata classes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from shipyard.spec import JobSpec, ShardingSpec, TrainSpec

BETAS = (0.9, 0.95)
EPS = 1e-8


class Engine(Protocol):
    model: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, lr: float) -> float: ...
    def skip(self, loss: torch.Tensor) -> None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


def lr_at(step: int, train: TrainSpec) -> float:
    """Learning rate for the update that produces step `step + 1`: linear warm-up, then schedule."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def parallelize(model: nn.Module, spec: JobSpec, shard_units: list[nn.Module],
                device: torch.device) -> Engine:
    strategy = spec.sharding.strategy
    if strategy == "ddp":
        return DDPEngine(model, spec, device)
    if strategy == "fsdp":
        return FSDPEngine(model, spec, shard_units, device)
    if strategy == "deepspeed":
        return DeepSpeedEngine(model, spec, device)
    raise AssertionError(strategy)


def _adamw(params, train: TrainSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=train.lr, betas=BETAS, eps=EPS, weight_decay=train.weight_decay)


class _TorchEngine:
    """What DDP and FSDP2 share: a torch optimizer and torch.distributed.checkpoint state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, train: TrainSpec):
        self.train = train

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def skip(self, loss: torch.Tensor) -> None:
        """Drop a step with a non-finite loss. The backward still runs (DDP's and FSDP's hooks
        expect one after every forward), then its gradients are thrown away."""
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        if torch.isfinite(norm):  # the norm is global, so every rank decides alike
            self.optimizer.step()
        # else: like DeepSpeed's ZeRO optimizers, drop the update (the caller sees the norm)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=_SafeFileSystemReader(str(directory)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else {}


def _safe_dcp_reader_class():
    import pickle
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    allowed = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    allowed_modules = {"torch.distributed.checkpoint.metadata"}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) in allowed or module in allowed_modules or is_dtype:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which "
                                         "Shipyard does not load (only checkpoint metadata types)")

    class SafeFileSystemReader(FileSystemReader):
        """DCP's reader unpickles `.metadata` with plain pickle; this one allows only DCP's own
        metadata classes (tensor data is read by DCP with `weights_only=True` already)."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def _SafeFileSystemReader(path: str):
    return _safe_dcp_reader_class()(path)


class DDPEngine(_TorchEngine):
    def __init__(self, model: nn.Module, spec: JobSpec, device: torch.device):
        super().__init__(spec.train)
        from torch.nn.parallel import DistributedDataParallel
        model.to(device)
        self.model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=spec.sharding.find_unused_parameters)
        self.optimizer = _adamw(self.model.parameters(), spec.train)


class FSDPEngine(_TorchEngine):
    """PyTorch FSDP2: `fully_shard` on each of the family's shard units, then on the root."""

    def __init__(self, model: nn.Module, spec: JobSpec, shard_units: list[nn.Module],
                 device: torch.device):
        super().__init__(spec.train)
        from torch.distributed.fsdp import fully_shard
        model.to(device)
        reshard = spec.sharding.reshard_after_forward
        for unit in shard_units:
            fully_shard(unit, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        self.model = model
        self.optimizer = _adamw(model.parameters(), spec.train)


def deepspeed_config(spec: JobSpec) -> dict:
    """The DeepSpeed config built from the spec, with the raw `sharding.deepspeed` block merged over it."""
    sh: ShardingSpec = spec.sharding
    world = spec.scaling.num_workers
    zero: dict = {"stage": sh.zero_stage}
    if sh.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if sh.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": spec.train.batch_size,
        "train_micro_batch_size_per_gpu": spec.train.batch_size // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {
            "lr": spec.train.lr, "betas": list(BETAS), "eps": EPS,
            "weight_decay": spec.train.weight_decay, "torch_adam": True}},
        "gradient_clipping": spec.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, sh.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 (optional CPU offload). Imported here only: workers need it, drivers don't."""

    TAG = "engine"

    def __init__(self, model: nn.Module, spec: JobSpec, device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        model.to(device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=deepspeed_config(spec))
        self.engine.checkpoint_engine = _safe_checkpoint_engine(self.engine.checkpoint_engine)
        self.model = self.engine
        self.stage = spec.sharding.zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def skip(self, loss: torch.Tensor) -> None:
        """Drop a step with a non-finite loss: no backward, so no NaN reaches ZeRO's gradient
        buffers; a forward without a backward is fine for stages 1-3 (tests/integration/test_nonfinite.py)."""
        del loss

    def step(self, lr: float) -> float:
        """DeepSpeed's ZeRO optimizers skip the update themselves when the gradient norm is
        NaN/inf and then report an infinite norm."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective
        else:
            sd = self.engine.module.state_dict()
        return {k: v.detach().cpu() for k, v in sd.items()} if dist.get_rank() == 0 and sd else {}


def _safe_checkpoint_engine(inner):
    """Wrap DeepSpeed's torch checkpoint engine so loading never unpickles arbitrary objects."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(inner) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(inner).__name__}; "
                           "Shipyard only loads checkpoints with weights_only=True")

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    inner.__class__ = SafeTorchCheckpointEngine
    return inner


def _deepspeed_safe_globals() -> list:
    """The plain data classes DeepSpeed pickles into its checkpoints (no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
