"""The seam between a paper's model and the platform.

Each paper package exposes one `Family`. The platform reads the spec's `model:` block into
`Config`, the `data:` block into `DataConfig`, and then only calls the functions below; it never
looks inside the model. Curricula that depend on the training step (layer dropout, early-exit
schedules, ...) live in `loss`, which receives the step, so a checkpoint's step fully determines
them; `curriculum_state` only reports that state for the checkpoint metadata and the logs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """A change of the model between two stages of a multi-stage job (e.g. TokenFormer's growth).

    Args:
        Args: dataclass of the stage's `args:` block (validated like the rest of the spec).
        config: `config(cfg, args) -> cfg`, the next stage's model config.
        state: `state(model_state, optim_state, args) -> (model_state, optim_state)` on full
            state dicts keyed by parameter name (optimizer state as
            `torch.distributed.checkpoint.state_dict` writes it); optim_state may be None (the
            next stage starts a fresh optimizer), and is then returned as None.
    """

    Args: type
    config: Callable[[Any, Any], Any]
    state: Callable[[dict, dict | None, Any], tuple[dict, dict | None]]


@dataclass(frozen=True)
class Family:
    """What a paper package hands the platform.

    Args:
        name: the registry key and the spec's `model.family`.
        Config: dataclass of the model's hyperparameters (the `model:` block minus `family`).
        DataConfig: dataclass of the `data:` block.
        build: `build(cfg) -> nn.Module`, deterministic given torch's RNG state.
        datasets: `datasets(cfg, data_cfg, cache_dir) -> (train, val)`, map-style datasets whose
            items are dicts of equally shaped tensors (the platform stacks them into batches).
        loss: `loss(model, batch, step, total_steps) -> (loss, metrics)`; metrics are detached
            scalar tensors averaged over workers for logging.
        evaluate: `evaluate(model, batch) -> metrics` on one validation batch, called under
            `torch.no_grad()` with the model in eval mode; averaged over batches and workers.
        shard_units: `shard_units(model) -> list[nn.Module]`, the blocks FSDP wraps one by one.
        curriculum_state: `curriculum_state(cfg, step, total_steps) -> dict` of JSON values
            describing step-driven schedules, recorded in checkpoints; None when there are none.
        exports: formats `shipyard export` can write besides plain safetensors, as
            `{name: export(model, cfg, out_dir)}` (e.g. `"hf"` for a Hugging Face directory).
        plots: `plots(metrics, out_dir) -> [png paths]` drawn from the final metrics (e.g. a
            per-layer chart); the platform logs them as MLflow artifacts. None when there are none.
        report: `report(model, cfg, data_cfg, cache_dir) -> str`, a short human-readable look at
            a trained model (what `shipyard report` and `make demo` print). None: metrics only.
        transforms: `{name: Transform}` a multi-stage job's `stages[i].transform` may name
            (e.g. `"grow"`); a stage without one continues the previous stage's model as it is.
    """

    name: str
    Config: type
    DataConfig: type
    build: Callable[[Any], nn.Module]
    datasets: Callable[[Any, Any, Path], tuple[Dataset, Dataset]]
    loss: Callable[[nn.Module, Batch, int, int], tuple[torch.Tensor, Metrics]]
    evaluate: Callable[[nn.Module, Batch], Metrics]
    shard_units: Callable[[nn.Module], list[nn.Module]]
    curriculum_state: Callable[[Any, int, int], dict] | None = None
    exports: dict[str, Callable[[nn.Module, Any, Path], None]] = field(default_factory=dict)
    plots: Callable[[dict[str, float], Path], list[Path]] | None = None
    report: Callable[[nn.Module, Any, Any, Path], str] | None = None
    transforms: dict[str, Transform] = field(default_factory=dict)
