"""Driver side of a run: job spec -> `TorchTrainer` on Ray Train V2, progress, tracking, Ctrl-C.

`run_job` starts (or with `resume=` continues) a run and blocks until it ends. `trainer.fit()`
runs on the calling thread (Ray Train handles Ctrl-C there) while a helper thread drains the run's
`Channel` actor: it draws the progress bar and logs to MLflow. The first Ctrl-C asks the workers
to stop after the current step with a checkpoint; a second one aborts at once.

A run's status comes from how far it got: the step of its last progress record or of its newest
complete checkpoint, whichever is later (the loop checkpoints the final step, so a run whose last
records are still being drained when `fit()` returns is still FINISHED).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from shipyard.cluster import connect, home
from shipyard.registry import MODELS
from shipyard.spec import JobSpec
from shipyard.train import checkpoint as ckpt
from shipyard.train.loop import train_loop
from shipyard.train.storage import filesystem, join, storage_root
from shipyard.train.tracking import Tracker, TrackingUnavailable

FOLLOWER_WAIT_S = 300.0
"""How long the driver waits, once the run has ended, for its follower to drain the last progress
records into MLflow. The follower is slow only while an `on_record` callback is (logging during a
tracking outage buffers without waiting); past this the run ends without the records still held,
and says so."""


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
            quiet: bool = False, run_name: str | None = None,
            tags: dict[str, str] | None = None, start_from: str | None = None) -> RunResult:
    """Run a job to its end (or to `stop_at`); `resume=(mlflow_run_id, run_name)` continues a run.

    `start_from` (a complete checkpoint's path) starts a new run from another run's full state
    (weights, optimizer, step, data position) with this spec's hyperparameters; the run's own
    checkpoints, once it has any, take precedence on a restart.

    `tags` are added to a new MLflow run (a sweep's trials carry `mlflow.parentRunId`).
    `on_record` sees every record from the workers: metrics `{"step": s, name: value, ...}` and
    events (`"run"` with the MLflow run id and run directory, first; `"worker"` per worker;
    `"resumed"`, `"skipped"`, `"checkpoint"` with the step and path of each checkpoint saved).
    A spec with `stages:` runs them in order under one parent run (stages.py).
    """
    if spec.stages:
        if stop_at is not None:
            raise ValueError("--stop-at does not apply to a multi-stage job (stages:)")
        from shipyard.train.stages import run_stages
        return run_stages(spec, address=address, resume=resume, on_record=on_record, quiet=quiet,
                          run_name=run_name, tags=tags)
    connect(address)
    root = storage_root(spec.storage.path)
    if resume:
        run_name = resume[1]
    elif run_name is None:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir = join(root, run_name)
    storage_fs, storage_path = filesystem(root, spec.storage)
    if isinstance(storage_fs, pafs.LocalFileSystem):
        storage_fs = None  # Ray's default for local paths
    else:  # fail before anything starts on a missing bucket or bad credentials
        bucket = storage_path.split("/")[0]
        if storage_fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ValueError(f"storage.path: bucket {bucket!r} does not exist (endpoint "
                             f"{spec.storage.endpoint_url or 'from the environment'})")
    tracker = Tracker(spec, run_name, run_dir, run_id=resume[0] if resume else None, tags=tags)
    if on_record:
        on_record({"event": "run", "run_id": tracker.run_id, "run_name": run_name, "run_dir": run_dir})
    # A Ctrl-C (or `shipyard stop`'s SIGINT) while the workers start is kept and honoured as a
    # graceful stop once they run; `_Trainer` installs the handler used during training.
    early_stop = threading.Event()
    previous_sigint = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: early_stop.set())
    channel = Channel.remote()
    progress = _Progress(spec, quiet)
    if not quiet:  # outage warnings go above the progress bar (quiet runs keep them on stderr)
        tracker.note = progress.note
    trainer = _Trainer(
        channel, lambda text: progress.note(text),
        train_loop,
        train_loop_config={"spec": spec.to_dict(secrets=True), "channel": channel, "run_dir": run_dir,
                           "stop_at": stop_at, "cache_dir": str(home() / "data"),
                           "cwd": os.getcwd(), "start_from": start_from},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
            placement_strategy=spec.scaling.placement.upper()),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            # Retention is ours (checkpoint.prune: N newest + the best, only complete ones count).
            checkpoint_config=CheckpointConfig(num_to_keep=None)),
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
    )
    last: dict = {}
    workers: dict[int, str] = {}  # rank -> Ray node id (of the latest worker group)
    groups: set[str] = set()  # placement groups the worker groups ran in
    done = threading.Event()

    abandoned = threading.Event()  # the driver stopped waiting for the follower (FOLLOWER_WAIT_S)
    tracking_error: list[BaseException] = []

    def follow():
        """Drain progress records into the bar and MLflow until the run ends (then once more)."""
        while True:
            finished = done.wait(timeout=0.5)
            records = ray.get(channel.drain.remote())
            for r in records:
                if on_record:
                    on_record(r)
                if abandoned.is_set():  # the run was finished without us: log nothing after it
                    return
                if r.get("event") == "resumed":
                    progress.note(f"resumed from step {r['step']} ({r['checkpoint']})")
                if r.get("event") == "skipped":
                    progress.note(f"step {r['step']}: the loss is not finite; update skipped "
                                  "(train.nonfinite: skip)")
                if r.get("event") == "worker":
                    workers[r["rank"]] = r["node_id"]
                    if r.get("placement_group"):
                        groups.add(r["placement_group"])
                    if len(workers) == spec.scaling.num_workers:
                        tracker.set_tag("workers", json.dumps(workers, sort_keys=True))
                if "event" in r:
                    continue
                last.update(r)
                progress.update(r)
            try:
                tracker.log([r for r in records if "event" not in r])
            except TrackingUnavailable as e:  # tracking.required and the server is gone
                if not tracking_error:
                    tracking_error.append(e)
                    progress.note(f"{e}; stopping the run after the current step (with a checkpoint)")
                    channel.request_stop.remote()
            if finished:
                return

    follower = threading.Thread(target=follow, name="shipyard-progress", daemon=True)
    follower.start()
    error: BaseException | None = None
    if early_stop.is_set():
        channel.request_stop.remote()
        trainer.stops = 1  # a further Ctrl-C aborts
    try:
        trainer.fit()
    except KeyboardInterrupt:
        done.set()
        follower.join(timeout=10)
        abandoned.set()
        progress.close()
        tracker.finish("KILLED", last)
        raise
    except Exception as e:  # TrainingFailedError and friends: recorded, reported by the caller
        error = e
    finally:
        done.set()
        if not abandoned.is_set():
            _join_follower(follower, abandoned, progress.note if not quiet else _warn, last)
        progress.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)

    _release_placement_groups(groups)
    if tracking_error and error is None:
        error = tracking_error[0]
    try:
        fs, path = filesystem(run_dir, spec.storage)
        latest = ckpt.latest_complete(fs, path)
    except Exception as e:  # storage unreachable (botocore errors are not OSErrors): the run's error says more
        progress.note(f"could not list checkpoints in {run_dir}: {e}")
        latest = None
    if latest and run_dir.startswith("s3://"):
        latest = "s3://" + latest
    # A run stopped early (Ctrl-C, --stop-at) is KILLED in MLflow's terms until resumed to its end.
    # Its newest complete checkpoint counts as well as its last record: a run resumed at its end
    # sends none, and a follower given up on (FOLLOWER_WAIT_S) has not passed on the last ones.
    done_at = last.get("step")
    if latest and error is None:
        saved_at = int(latest.rstrip("/").rsplit("-", 1)[-1])
        done_at = saved_at if done_at is None else max(done_at, saved_at)
    status = "FAILED" if error else ("FINISHED" if done_at == spec.train.steps else "KILLED")
    if latest:
        tracker.set_tag("checkpoint", latest)
    tracker.finish(status, last, plots=MODELS[spec.family].plots)
    ray.kill(channel)
    return RunResult(run_id=tracker.run_id, run_name=run_name, status=status, checkpoint=latest,
                     metrics=last, tracking_uri=tracker.client.tracking_uri, error=error)


def _join_follower(follower: threading.Thread, abandoned: threading.Event, note: Callable[[str], None],
                   last: dict) -> None:
    """Wait for the follower's last drain (it returns once it has logged what the run sent),
    up to FOLLOWER_WAIT_S; then tell it to stop before it logs anything more."""
    follower.join(timeout=min(10.0, FOLLOWER_WAIT_S))
    if follower.is_alive():
        note(f"the run has ended; waiting up to {FOLLOWER_WAIT_S:.0f} s for its last progress records "
             "(an on_record callback is slow)")
        follower.join(timeout=max(0.0, FOLLOWER_WAIT_S - 10.0))
    if follower.is_alive():
        abandoned.set()
        note(f"gave up on the progress records after step {last.get('step', 0)} after waiting "
             f"{FOLLOWER_WAIT_S:.0f} s: they are not logged to MLflow; the status comes from the checkpoints")


def _warn(text: str) -> None:
    """A quiet run's warnings go to stderr (a bar's go above the bar)."""
    print(text, file=sys.stderr, flush=True)


def _release_placement_groups(groups: set[str], wait_s: float = 20.0) -> None:
    """Make sure the run's worker placement groups are gone before returning.

    `fit()` can return before Train V2's controller has removed its workers' placement group; if
    the caller's process then ends (a Tune trial actor does, right after its function returns)
    the group outlives its run, and Train's detached `PlacementGroupCleaner` cannot remove it
    here (its state-API calls time out; see ray#54305), so later trials wait forever for CPUs.
    Wait briefly for the controller, then remove what is left."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
    from ray._raylet import PlacementGroupID
    deadline = time.monotonic() + wait_s
    for hex_id in groups:
        group = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
        while True:
            state = placement_group_table(group).get("state")
            if state in (None, "REMOVED"):
                break
            if time.monotonic() > deadline:
                try:
                    remove_placement_group(group)
                except Exception:  # removed meanwhile
                    pass
                break
            time.sleep(0.5)


class _Trainer(TorchTrainer):
    """A `TorchTrainer` whose Ctrl-C first asks the workers to stop with a checkpoint.

    Ray Train V2 registers its own SIGINT handler when `fit()` runs on the main thread (it aborts
    the run at once); this keeps that as the second Ctrl-C and makes the first one graceful.
    """

    def __init__(self, channel, note, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel, self.note, self.stops = channel, note, 0

    def _register_sigint_handler(self, controller) -> None:
        def handler(signum, frame):
            self.stops += 1
            if self.stops == 1:
                self.channel.request_stop.remote()
                self.note("Ctrl-C: stopping after the current step with a checkpoint "
                          "(again: abort now, without one)")
            elif self.stops == 2:
                self.note("Ctrl-C: aborting the run; the last complete checkpoint stays usable")
                controller.abort.remote()
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)


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
        # Not a terminal (a submitted job's log, CI): plain lines every 10 s instead of a live bar.
        self.plain = not quiet and not self.bar.console.is_terminal
        self.total, self.printed_at = spec.train.steps, 0.0
        if self.plain:
            self.bar.disable = True
        self.bar.start()

    def update(self, r: dict) -> None:
        for key, label, fmt in (("train/loss", "loss", "{:.4f}"), ("val/loss", "val", "{:.4f} (step {step})"),
                                ("samples_per_s", "samples/s", "{:.1f}")):
            if key in r:  # the validation loss is kept between evaluations, so it says whose it is
                self.info[label] = fmt.format(r[key], step=r["step"])
        info = "  ".join(f"{k} {v}" for k, v in self.info.items())
        self.bar.update(self.task, completed=r["step"], info=info)
        if self.plain and (time.monotonic() - self.printed_at > 10 or r["step"] == self.total):
            self.printed_at = time.monotonic()
            self.bar.console.print(f"step {r['step']}/{self.total}  {info}", highlight=False)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bar.console.print(text)

    def close(self) -> None:
        self.bar.stop()
