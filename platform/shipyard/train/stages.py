"""Multi-stage jobs (`stages:` in a job spec): one MLflow parent run, one child run per stage.

A stage after the first starts from the previous stage's final checkpoint. Before its run starts,
`convert` turns that checkpoint into the new run's first checkpoint (`checkpoint-00000000`):
the full model and optimizer state are read, changed by the family's transform (e.g. TokenFormer's
`grow`, which pads Adam's moments with zeros and keeps the step count), and written in the
platform's own format. The stage's run then starts from it through the ordinary resume path, so a
stage that crashes resumes from its newest checkpoint like any run, and `shipyard resume PARENT`
skips the stages whose runs finished.

Where the state comes from:
* ddp and fsdp checkpoints: the sharded `torch.distributed.checkpoint` state, read in one process
  into full tensors (DCP reshards on load), optimizer moments included;
* deepspeed checkpoints: the consolidated `model.safetensors` only (DeepSpeed's optimizer files
  would have to be unpickled), so `optimizer: continue` is refused for them.
The converted state is written for ddp or fsdp (DCP reshards it for any world size); DeepSpeed
cannot start a stage from it, which the spec check says.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs
import torch

from shipyard.registry import MODELS
from shipyard.spec import JobSpec, StageSpec, parse_job, stage_spec
from shipyard.train import checkpoint as ckpt
from shipyard.train.storage import download, filesystem, join, storage_root

STAGE_TAG = "shipyard.stage"
PARENT_TAG = "mlflow.parentRunId"


def run_stages(spec: JobSpec, *, address: str | None = None, resume: tuple[str, str] | None = None,
               on_record: Callable[[dict], None] | None = None, quiet: bool = False,
               run_name: str | None = None, tags: dict[str, str] | None = None):
    """Run every stage of `spec` in order (resuming: skip finished stages, resume the one that
    stopped). Returns a `RunResult` of the parent run; its checkpoint is the last stage's."""
    from shipyard.cluster import connect
    from shipyard.train.launch import RunResult, run_job
    from shipyard.train.tracking import TAG, client
    connect(address)
    mlflow = client(spec.tracking.uri)
    if resume:
        parent_id, run_name = resume
        mlflow.update_run(parent_id, status="RUNNING")
    else:
        run_name = run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{_suffix()}"
        parent_id = _start_parent(mlflow, spec, run_name, tags or {})
    children = _children(mlflow, spec, parent_id)
    root = storage_root(spec.storage.path)
    previous: str | None = None
    metrics: dict = {}  # every stage's final metrics as "<stage>/<name>"
    last: dict = {}  # the last stage run's own, unprefixed (what `shipyard run` prints)
    for i, stage in enumerate(spec.stages):
        child = children.get(stage.name)
        if child is not None and child.info.status == "FINISHED":
            previous = child.data.tags[TAG + "checkpoint"]
            _emit(on_record, {"event": "stage_skipped", "stage": stage.name, "run_id": child.info.run_id,
                              "checkpoint": previous})
            continue
        child_name = f"{run_name}-{stage.name}"
        sspec = stage_spec(spec, i)
        run_dir = join(root, child_name)
        if i > 0 and not _has_checkpoint(run_dir, spec):
            convert(previous, run_dir + "/" + ckpt.dir_name(0), sspec, stage, spec.storage)
        _emit(on_record, {"event": "stage", "stage": stage.name, "index": i, "run_name": child_name})
        mlflow.set_tag(parent_id, TAG + "run_dir", run_dir)  # `shipyard export/report PARENT`: the newest stage
        try:
            result = run_job(sspec, address=address, quiet=quiet, run_name=child_name,
                             resume=(child.info.run_id, child_name) if child is not None else None,
                             on_record=None if on_record is None else (lambda r, s=stage.name: on_record({**r, "stage": s})),
                             tags={PARENT_TAG: parent_id, STAGE_TAG: stage.name})
        except KeyboardInterrupt:
            mlflow.set_terminated(parent_id, status="KILLED")
            raise
        metrics.update({f"{stage.name}/{k}": v for k, v in result.metrics.items()
                        if isinstance(v, (int, float))})
        last = result.metrics
        if result.status != "FINISHED":
            mlflow.set_terminated(parent_id, status="FAILED" if result.error else "KILLED")
            return RunResult(run_id=parent_id, run_name=run_name, status=result.status,
                             checkpoint=result.checkpoint, metrics=metrics,
                             tracking_uri=mlflow.tracking_uri, error=result.error)
        previous = result.checkpoint
    for k, v in metrics.items():
        mlflow.log_metric(parent_id, k, v)
    if previous:
        mlflow.set_tag(parent_id, TAG + "checkpoint", previous)
    mlflow.set_terminated(parent_id, status="FINISHED")
    return RunResult(run_id=parent_id, run_name=run_name, status="FINISHED", checkpoint=previous,
                     metrics={**metrics, **last}, tracking_uri=mlflow.tracking_uri)


def convert(source: str, target: str, spec: JobSpec, stage: StageSpec, storage=None) -> str:
    """Write the first checkpoint of a stage (`spec` is the stage's own spec, `stage` says how)
    from the previous stage's checkpoint `source`; both may be local paths or s3:// URIs."""
    src_fs, src_path = filesystem(source, storage)
    with tempfile.TemporaryDirectory(prefix="shipyard-convert-") as tmp:
        local = download(src_fs, src_path, Path(tmp) / "source")
        out = Path(tmp) / "target"
        convert_local(local, out, spec, stage)
        dst_fs, dst_path = filesystem(target, storage)
        if isinstance(dst_fs, pafs.LocalFileSystem):
            shutil.rmtree(dst_path, ignore_errors=True)  # what an interrupted conversion left
            shutil.copytree(out, dst_path)
        else:
            pafs.copy_files(str(out), dst_path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dst_fs)
    return target


def convert_local(source: Path, target: Path, spec: JobSpec, stage: StageSpec) -> None:
    """`convert` between local directories. The manifest is written last, so a conversion that
    stops half-way leaves no complete checkpoint behind."""
    meta = ckpt.read_meta(source)
    src_spec = parse_job(meta.spec)
    family = MODELS[src_spec.family]
    if family.name != spec.family:
        raise ValueError(f"{source}: a {src_spec.family} checkpoint cannot start a {spec.family} stage")
    model_sd, optim_sd = read_full_state(source, meta, src_spec, want_optimizer=stage.optimizer == "continue",
                                         stage_name=stage.name)
    if stage.transform is not None:
        transform = family.transforms[stage.transform]
        model_sd, optim_sd = transform.state(model_sd, optim_sd, transform.Args(**stage.args))

    from shipyard.train.parallelize import _adamw
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
    model = family.build(spec.model)
    optimizer = _adamw(model.parameters(), spec.train)
    get_state_dict(model, optimizer)  # creates the optimizer's state (zero moments, step 0)
    if optim_sd is None:  # optimizer: fresh; get_state_dict made its state with a zero-lr step,
        set_model_state_dict(model, model_sd)  # so take the step count back to 0 (as new)
        for state in optimizer.state.values():
            for value in state.values():
                value.zero_()
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for group in optimizer.param_groups:  # the moments carry over, the hyperparameters are this stage's
        group["weight_decay"] = spec.train.weight_decay
    _write(target, model, optimizer, spec, meta)


def read_full_state(directory: Path, meta: ckpt.Meta, spec: JobSpec, want_optimizer: bool,
                    stage_name: str = "?") -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state of a checkpoint, keyed by parameter name."""
    family = MODELS[spec.family]
    if meta.strategy == "deepspeed":
        if want_optimizer:
            raise ValueError(f"stage {stage_name}: optimizer: continue needs the optimizer state, which "
                             f"Shipyard reads from ddp and fsdp checkpoints only; {directory} is a deepspeed "
                             "checkpoint: use optimizer: fresh")
        return ckpt.load_weights(directory), None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from shipyard.train.parallelize import _SafeFileSystemReader, _adamw
    model = family.build(spec.model)
    optimizer = _adamw(model.parameters(), spec.train)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # full-size targets DCP loads into
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=_SafeFileSystemReader(str(directory / ckpt.STATE)), no_dist=True)
    return state["model"], (state["optim"] if want_optimizer else None)


def _write(target: Path, model, optimizer, spec: JobSpec, source_meta: ckpt.Meta) -> None:
    """A complete step-0 checkpoint of `spec`'s run: DCP state, consolidated weights, meta,
    manifest (last). The data position carries over, so the next stage sees new batches."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    target.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target / ckpt.STATE), no_dist=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(target / ckpt.WEIGHTS),
              metadata={"family": spec.family, "format_version": str(ckpt.FORMAT_VERSION)})
    meta = ckpt.Meta(step=0, batches=source_meta.batches, family=spec.family, strategy=spec.sharding.strategy,
                     world_size=spec.scaling.num_workers, spec=spec.to_dict(), metrics={},
                     created=time.time())
    (target / ckpt.META).write_text(json.dumps(meta.__dict__, indent=1))
    files = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}
    manifest = {"format_version": ckpt.FORMAT_VERSION, "step": 0, "files": files}
    (target / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=1))


def _start_parent(mlflow, spec: JobSpec, run_name: str, tags: dict[str, str]) -> str:
    """The parent run: the whole spec as params and `spec.yaml` (what `shipyard resume` reads)."""
    import yaml
    from mlflow.entities import Param
    from shipyard.spec import flatten
    from shipyard.train.tracking import TAG, _artifact_root, _param
    exp = mlflow.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        spec.tracking.experiment, artifact_location=_artifact_root(spec.tracking.uri, spec.tracking.experiment))
    run = mlflow.create_run(exp_id, run_name=run_name, tags={
        "mlflow.runName": run_name, TAG + "family": spec.family, TAG + "job": spec.name,
        TAG + "strategy": spec.sharding.strategy, TAG + "world_size": str(spec.scaling.num_workers),
        TAG + "stages": ",".join(s.name for s in spec.stages), **tags})
    params = [Param(k, _param(v)) for k, v in flatten(spec.to_dict()).items()]
    for i in range(0, len(params), 100):
        mlflow.log_batch(run.info.run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        mlflow.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def _children(mlflow, spec: JobSpec, parent_id: str) -> dict:
    """The parent's stage runs by stage name (the newest if a stage has several)."""
    exp_id = mlflow.get_run(parent_id).info.experiment_id
    runs = mlflow.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return {r.data.tags[STAGE_TAG]: r for r in runs if STAGE_TAG in r.data.tags}


def _has_checkpoint(run_dir: str, spec: JobSpec) -> bool:
    fs, path = filesystem(run_dir, spec.storage)
    return ckpt.latest_complete(fs, path) is not None


def _emit(on_record, record: dict) -> None:
    if on_record is not None:
        on_record(record)


def _suffix() -> str:
    import uuid
    return uuid.uuid4().hex[:4]
