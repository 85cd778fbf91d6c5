"""MLflow tracking, done by the driver only: one MLflow run per job, never one per worker.

The default store is sqlite at `.shipyard/mlflow.db` (no server; concurrent writers would lock it,
which is why workers never write). Metrics arrive from rank 0 through the run's channel; a step
that is logged once is never logged again, so steps re-run after a restart from an older
checkpoint leave no duplicates.

A tracking server that goes away mid-run does not stop training (unless `tracking.required`):
metric points and tags are kept in order in memory, one warning is printed, and every later
`log` retries them oldest first. `finish` retries for a bounded time, then writes what is still
unsent (with the run's final status) to `.shipyard/unsent/<run_id>.json`; `send_unsent` replays it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # before mlflow reads it

import mlflow
import requests
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shipyard.cluster import home
from shipyard.spec import JobSpec, flatten

TAG = "shipyard."
BATCH = 500  # metrics per log_batch (MLflow's limit is 1000)

# MLflow's HTTP client reads these on every request (mlflow/utils/rest_utils.py: http_request);
# its defaults (7 retries, backoff factor 2, 120 s timeout) block a call for minutes on a dead
# server. The Tracker's own calls use these instead, unless the user has set the variables.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached: at the start of a run, or mid-run with `tracking.required`."""

    def __init__(self, uri: str, message: str):
        super().__init__(message)
        self.uri = uri


def tracking_uri(spec_uri: str | None) -> str:
    return spec_uri or f"sqlite:///{home() / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(uri))


class _Unreachable(Exception):
    """An MLflow call failed because the store could not be reached (the cause is chained)."""


class Tracker:
    """Owns the MLflow run of one job on the driver.

    `note` receives the outage warnings (default: printed on stderr); `finish_retry_s` bounds how
    long `finish` keeps retrying an unreachable server before writing the unsent file.
    """

    def __init__(self, spec: JobSpec, run_name: str, run_dir: str, run_id: str | None = None, *,
                 note: Callable[[str], None] | None = None, finish_retry_s: float = 30.0,
                 tags: dict[str, str] | None = None):
        self.client = client(spec.tracking.uri)
        self.uri = self.client.tracking_uri
        self.spec = spec
        self.required = spec.tracking.required
        self.note = note or _stderr
        self.finish_retry_s = finish_retry_s
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_step: dict[str, int] = {}
        self.buffer: list[Metric] = []  # logged but not yet sent, oldest first
        self.tags: dict[str, str] = {}  # set but not yet sent
        self.outage: str | None = None  # the error that started the current outage
        self.lock = threading.RLock()  # the follower thread logs while the main thread may finish
        try:
            self._start(spec, run_name, run_dir, run_id, tags or {})
        except _Unreachable as e:
            raise TrackingUnavailable(self.uri, f"cannot reach the tracking server {self.uri} to "
                                      f"{'resume' if run_id else 'start'} the run: {_short(e)}") from e.__cause__

    def _start(self, spec: JobSpec, run_name: str, run_dir: str, run_id: str | None,
               extra_tags: dict[str, str]) -> None:
        call = self._call
        if run_id is None:
            exp = call(self.client.get_experiment_by_name, spec.tracking.experiment)
            exp_id = exp.experiment_id if exp else call(
                self.client.create_experiment, spec.tracking.experiment,
                artifact_location=_artifact_root(spec.tracking.uri, spec.tracking.experiment))
            tags = {"mlflow.runName": run_name, TAG + "family": spec.family,
                    TAG + "strategy": spec.sharding.strategy, TAG + "world_size": str(spec.scaling.num_workers),
                    TAG + "run_dir": run_dir, TAG + "job": spec.name, "mlflow.source.git.commit": _git_commit(),
                    **extra_tags}
            run = call(self.client.create_run, exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(k, _param(v)) for k, v in flatten(spec.to_dict()).items()]
            for i in range(0, len(params), 100):
                call(self.client.log_batch, self.run_id, params=params[i:i + 100])
        else:
            self.run_id = run_id
            call(self.client.update_run, run_id, status="RUNNING")
            for key in call(self.client.get_run, run_id).data.metrics:
                points = call(self.client.get_metric_history, run_id, key)
                self.history[key] = sorted((m.step, m.value) for m in points)
                self.last_step[key] = max(m.step for m in points)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spec.yaml"
            path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            call(self.client.log_artifact, self.run_id, str(path))

    def log(self, records: list[dict]) -> None:
        """Log metric records `{"step": s, name: value, ...}`; steps already logged are skipped.

        Unsent points from an outage go first. Raises `TrackingUnavailable` on an outage only
        with `tracking.required`; otherwise the points stay buffered for the next call.
        """
        now = int(time.time() * 1000)
        with self.lock:
            carried = len(self.buffer)
            for rec in records:
                step = rec.get("step")
                for k, v in rec.items():
                    if not isinstance(v, (int, float)) or step <= self.last_step.get(k, -1):
                        continue
                    self.last_step[k] = step  # at buffering time, so a re-run step is never doubled
                    self.history.setdefault(k, []).append((step, float(v)))
                    self.buffer.append(Metric(k, float(v), now, step))
            self._flush(carried)

    def set_tag(self, key: str, value: str) -> None:
        """Set a `shipyard.` tag; on an outage it waits with the buffered points (never raises for
        one, even with `tracking.required`: tags are set as the run ends, and `finish` keeps them)."""
        with self.lock:
            self.tags[TAG + key] = value
            self._flush(len(self.buffer), strict=False)

    def finish(self, status: str, final: dict, plots=None) -> Path | None:
        """Artifacts (final metrics JSON, loss curve, the family's plots) and the run's end state.

        An unreachable server is retried for up to `finish_retry_s`; then what is still unsent
        goes to `unsent/<run_id>.json` under the Shipyard home, whose path is returned (None when
        everything was sent). Never raises for an outage, even with `tracking.required`.
        """
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "final_metrics.json").write_text(json.dumps(final, indent=1, default=str))
            files = [Path(tmp) / "final_metrics.json"]
            if self.history.get("train/loss"):
                png = Path(tmp) / "loss_curve.png"
                plot_losses(self.history, png, title=self.spec.name)
                files.append(png)
            if plots is not None and final:
                files.extend(Path(p) for p in plots(final, Path(tmp)))
            carried = len(self.buffer)
            # (artifact file or None, call) in order; each is done once, an outage retries from there
            steps: list[tuple[Path | None, Callable[[], object]]] = [(None, self._send)]
            steps += [(f, lambda f=f: self._call(self.client.log_artifact, self.run_id, str(f))) for f in files]
            steps.append((None, lambda: self._call(self.client.set_terminated, self.run_id, status=status)))
            deadline = time.monotonic() + self.finish_retry_s
            delay, error = 1.0, self.outage
            try:
                while steps:
                    try:
                        steps[0][1]()
                        steps.pop(0)
                    except _Unreachable as e:
                        error = _short(e)
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        time.sleep(min(delay, left))
                        delay = min(delay * 2, 8.0)
            except KeyboardInterrupt:  # Ctrl-C while waiting for the server: keep what is unsent
                self.outage = error
                self._write_unsent(status, final, [f for f, _ in steps if f is not None])
                raise
            if not steps:
                if self.outage is not None:
                    self.outage = None
                    self.note(f"tracking server {self.uri} reachable again; {carried} buffered metric points sent")
                return None
            self.outage = error
            path = self._write_unsent(status, final, [f for f, _ in steps if f is not None])
            self.note(f"warning: tracking server {self.uri} unreachable ({error}); "
                      f"{len(self.buffer)} unsent metric points and the final status {status} are saved "
                      f"in {path} (send them later with shipyard.train.tracking.send_unsent)")
            return path

    # -- sending, buffering, outages --

    def _call(self, fn, *args, **kwargs):
        """Every MLflow call: fail-fast HTTP settings; an unreachable store becomes `_Unreachable`."""
        try:
            with _fail_fast_http():
                return fn(*args, **kwargs)
        except Exception as e:
            if _is_outage(e):
                raise _Unreachable(str(e)) from e
            raise

    def _send(self) -> None:
        """Send buffered metric points (oldest first) and pending tags. On an outage what is unsent
        stays pending; a batch the store rejects (a bad metric name...) is dropped and the error raised."""
        while self.buffer:
            chunk = self.buffer[:BATCH]
            try:
                self._call(self.client.log_batch, self.run_id, metrics=chunk)
            except _Unreachable:
                raise
            except Exception:
                del self.buffer[:len(chunk)]  # retrying it would fail forever and block what follows
                raise
            del self.buffer[:len(chunk)]
        for key in list(self.tags):
            try:
                self._call(self.client.set_tag, self.run_id, key, self.tags[key])
            except _Unreachable:
                raise
            except Exception:
                del self.tags[key]
                raise
            del self.tags[key]

    def _flush(self, carried: int, strict: bool | None = None) -> None:
        try:
            self._send()
        except _Unreachable as e:
            first = self.outage is None
            self.outage = _short(e)
            if self.required if strict is None else strict:
                raise TrackingUnavailable(self.uri, f"tracking server {self.uri} is unreachable and "
                                          f"tracking.required is set: {self.outage}") from e.__cause__
            if first:
                self.note(f"warning: tracking server {self.uri} is unreachable ({self.outage}); training "
                          "continues, metrics are buffered and sent when it is back")
            return
        if self.outage is not None:
            self.outage = None
            self.note(f"tracking server {self.uri} reachable again; {carried} buffered metric points sent")

    def _write_unsent(self, status: str, final: dict, files: list[Path]) -> Path:
        out = home() / "unsent"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.run_id}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        metrics = old.get("metrics", [])
        seen = {(m["key"], m["step"], m["timestamp"]) for m in metrics}
        metrics += [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                    for m in self.buffer if (m.key, m.step, m.timestamp) not in seen]
        artifacts_dir = out / self.run_id
        artifacts = list(old.get("artifacts", []))
        for f in files:
            artifacts_dir.mkdir(exist_ok=True)
            shutil.copy2(f, artifacts_dir / f.name)
            if str(artifacts_dir / f.name) not in artifacts:
                artifacts.append(str(artifacts_dir / f.name))
        doc = {"run_id": self.run_id, "tracking_uri": self.uri, "status": status, "final": final,
               "metrics": metrics, "tags": {**old.get("tags", {}), **self.tags}, "artifacts": artifacts,
               "error": self.outage, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(path)
        return path


def send_unsent(path: str | Path, uri: str | None = None) -> str:
    """Replay a run's `unsent/<run_id>.json` (metrics, tags, artifacts, final status) to its
    tracking server (or `uri`), then delete it; returns the run id."""
    path = Path(path)
    doc = json.loads(path.read_text())
    mlflow_client = MlflowClient(tracking_uri=uri or doc["tracking_uri"])
    run_id = doc["run_id"]
    with _fail_fast_http():
        metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in doc["metrics"]]
        for i in range(0, len(metrics), BATCH):
            mlflow_client.log_batch(run_id, metrics=metrics[i:i + BATCH])
        if doc["tags"]:
            mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in doc["tags"].items()])
        for f in doc["artifacts"]:
            mlflow_client.log_artifact(run_id, f)
        mlflow_client.set_terminated(run_id, status=doc["status"])
    shutil.rmtree(path.parent / run_id, ignore_errors=True)
    path.unlink()
    return run_id


_env_lock = threading.Lock()
_env_users = 0
_env_added: list[str] = []


@contextmanager
def _fail_fast_http():
    """`FAIL_FAST_HTTP` in the environment for the duration of an MLflow call, for variables the
    user has not set; shared by concurrent callers (the last one out removes them)."""
    global _env_users, _env_added
    with _env_lock:
        if _env_users == 0:
            _env_added = [k for k in FAIL_FAST_HTTP if k not in os.environ]
            for k in _env_added:
                os.environ[k] = FAIL_FAST_HTTP[k]
        _env_users += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:
                for k in _env_added:
                    os.environ.pop(k, None)
                _env_added = []


def _is_outage(e: BaseException) -> bool:
    """Could not reach the store, or it answered 5xx/429: worth retrying later. A 4xx answer
    (a bad request, a deleted run) and programming errors are not."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return e.response.status_code >= 500 or e.response.status_code == 429
    if isinstance(e, OSError):  # refused, reset, timeouts, DNS; requests' exceptions are OSErrors
        return True
    if isinstance(e, MlflowException):  # MLflow wraps connection failures as INTERNAL_ERROR (500)
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return False


def _short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def plot_losses(history: dict[str, list[tuple[int, float]]], out: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in ("train/loss", "val/loss"):
        if history.get(key):
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if key.startswith("val") else None, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _artifact_root(uri: str | None, experiment: str) -> str | None:
    if uri is None:  # embedded store: artifacts beside the database, not in the working dir
        return (home() / "mlartifacts" / experiment).as_uri()
    return None  # a server decides


def _param(v) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s[:6000]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
