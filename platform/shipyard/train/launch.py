"""Driver side of a run: job spec -> `TorchTrainer` on Ray Train V2, progress, tracking, Ctrl-C.

`run_job` starts (or with `resume=` continues) a run and blocks until it ends. `trainer.fit()`
runs in a thread while the main thread drains the run's `Channel` actor: it draws the progress bar
and logs to MLflow. The first Ctrl-C asks the workers to stop after the current step with a
checkpoint; a second one aborts.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from shipyard.cluster import connect, home
from shipyard.spec import JobSpec
from shipyard.train import checkpoint as ckpt
from shipyard.train.loop import train_loop
from shipyard.train.storage import filesystem, join, storage_root
from shipyard.train.tracking import Tracker


@ray.remote(num_cpus=0)
class Channel:
    """Progress records from rank 0 to the driver, and the driver's stop request back."""

    def __init__(self):
        self.records: list[dict] = []
        self.stop = False

    def push(self, record: dict) -> None:
        self.records.append(record)

    def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


@dataclass
class RunResult:
    run_id: str
    run_name: str
    status: str
    checkpoint: str | None
    metrics: dict
    tracking_uri: str
    error: BaseException | None = None


def run_job(spec: JobSpec, *, address: str | None = None, resume: tuple[str, str] | None = None,
            stop_at: int | None = None, on_record: Callable[[dict], None] | None = None,
            quiet: bool = False) -> RunResult:
    """Run a job to its end (or to `stop_at`); `resume=(mlflow_run_id, run_name)` continues a run."""
    connect(address)
    root = storage_root(spec.storage.path)
    run_name = resume[1] if resume else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir = join(root, run_name)
    tracker = Tracker(spec, run_name, run_dir, run_id=resume[0] if resume else None)
    channel = Channel.remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.to_dict(), "channel": channel, "run_dir": run_dir,
                           "stop_at": stop_at, "cache_dir": str(home() / "data")},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
            placement_strategy=spec.scaling.placement.upper()),
        run_config=RunConfig(
            name=run_name, storage_path=root,
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep or None)),
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # reported on the main thread
            outcome["error"] = e

    progress = _Progress(spec, quiet)
    thread = threading.Thread(target=fit, name="shipyard-fit", daemon=True)
    thread.start()
    interrupted = False
    last: dict = {}
    try:
        while True:
            try:
                alive = thread.is_alive()
                records = ray.get(channel.drain.remote())
                for r in records:
                    if "event" in r:
                        progress.note(f"resumed from step {r['step']} ({r['checkpoint']})")
                        continue
                    last.update(r)
                    progress.update(r)
                    if on_record:
                        on_record(r)
                tracker.log([r for r in records if "event" not in r])
                if not alive:
                    break
                thread.join(timeout=0.5)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                channel.request_stop.remote()
                progress.note("stopping after the current step and saving a checkpoint "
                              "(Ctrl-C again to abort)")
    except KeyboardInterrupt:
        tracker.finish("KILLED", last)
        progress.close()
        raise
    finally:
        progress.close()

    fs, path = filesystem(run_dir)
    latest = ckpt.latest_complete(fs, path)
    error = outcome.get("error")
    status = "FAILED" if error else "FINISHED"
    if latest:
        tracker.set_tag("checkpoint", latest)
    tracker.finish(status, last)
    ray.kill(channel)
    return RunResult(run_id=tracker.run_id, run_name=run_name, status=status, checkpoint=latest,
                     metrics=last, tracking_uri=tracker.client.tracking_uri, error=error)


class _Progress:
    """A live progress bar (step, loss, throughput) on the driver's terminal."""

    def __init__(self, spec: JobSpec, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.quiet = quiet
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
                            disable=quiet)
        self.task = self.bar.add_task(spec.name, total=spec.train.steps, info="starting workers...")
        self.info: dict[str, str] = {}
        self.bar.start()

    def update(self, r: dict) -> None:
        for key, label, fmt in (("train/loss", "loss", "{:.4f}"), ("val/loss", "val", "{:.4f}"),
                                ("samples_per_s", "samples/s", "{:.1f}")):
            if key in r:
                self.info[label] = fmt.format(r[key])
        self.bar.update(self.task, completed=r["step"],
                        info="  ".join(f"{k} {v}" for k, v in self.info.items()))

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bar.console.print(text)

    def close(self) -> None:
        self.bar.stop()
