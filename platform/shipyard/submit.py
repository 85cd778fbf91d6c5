"""Submitting a job spec to a Ray cluster through the Ray Jobs API, and following it there.

`shipyard submit JOB --address http://HEAD:8265` validates the spec here first (a bad spec never
reaches the cluster), then submits `python -m shipyard.cli run job.yaml --run-name ID` with a
runtime environment that carries the code: `py_modules` holds this checkout's two packages
(`shipyard`, `shipyard_models`, installed on every node that runs a task of the job) and
`working_dir` only the resolved spec. The cluster's nodes need the same Python dependencies
(torch, ray, mlflow, ...): the image or the cluster's setup commands provide them.

Where results go. On a cluster on this machine (the address is loopback, e.g. the two-node cluster
of `cluster/local/ray-local.sh`) the submitted run uses this checkout's embedded state
(`SHIPYARD_HOME`: MLflow sqlite store, checkpoints), exactly as a local run would. A remote
cluster cannot reach those, so there the spec must name a tracking server (`tracking.uri`) and
shared storage (`storage.path: s3://...` or an absolute path on a shared filesystem).

Credentials never travel with the job: storage keys written in the spec are dropped (with a
warning) and the cluster's nodes must have them in their environment (a Kubernetes Secret, see
cluster/README.md). The cluster's token authentication (Ray 2.60 turns it on for
`ray start --head`) is handled by Ray's SDK from `RAY_AUTH_MODE=token` plus `RAY_AUTH_TOKEN` or
`RAY_AUTH_TOKEN_PATH` (or ~/.ray/auth_token); the token is never printed or logged.

The submission id is also the run's name (MLflow run name, storage directory), so `shipyard
status ID`, `shipyard runs` and `shipyard resume ID` all speak of the same thing.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import yaml

from shipyard.spec import SECRETS, JobSpec

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
AGENT_WAIT_S = 90
STOP_WAIT_S = 60
"""How long `shipyard stop` waits for the graceful stop (step, checkpoint) before Ray kills the job."""


class SubmitError(RuntimeError):
    """A job that cannot be submitted (bad address, unreachable cluster, refused token, ...)."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / "
                          "Jobs API) or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address!r}: the Jobs API is reached over HTTP, e.g. "
                          "http://127.0.0.1:8265 (the dashboard port), not the GCS address")
    return address


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient
    address = resolve_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth refused: Ray's message explains the token part
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_clean(e)}") from None


def is_local(address: str) -> bool:
    return urlparse(address).hostname in LOOPBACK


def remote_problems(spec: JobSpec) -> list[str]:
    """What keeps a spec from writing its results somewhere a remote cluster and this machine share."""
    problems = []
    if spec.tracking.uri is None or spec.tracking.uri.startswith(("sqlite:", "file:")) or "://" not in spec.tracking.uri:
        problems.append("tracking.uri: a run on a remote cluster must log to a tracking server it can "
                        "reach, e.g. tracking.uri=http://mlflow.shipyard:5000 "
                        f"(now {spec.tracking.uri or 'the embedded sqlite store'})")
    path = spec.storage.path
    if path is None or (not path.startswith("s3://") and not os.path.isabs(path)):
        problems.append("storage.path: a run on a remote cluster needs shared storage, e.g. "
                        f"storage.path=s3://bucket/prefix (now {path or 'the embedded .shipyard/runs'})")
    return problems


def submit(spec: JobSpec, address: str | None = None, *, submission_id: str | None = None,
           entrypoint_cpus: float = 0) -> str:
    """Submit `spec` to the cluster; return the submission id (= the run's name)."""
    import shipyard
    import shipyard_models
    from shipyard.cluster import home

    address = resolve_address(address)
    client = job_client(address)
    # `shipyard stop` (the Jobs API's stop) then acts like a Ctrl-C: the run stops after its current
    # step with a checkpoint (status KILLED, resumable) instead of dying on SIGTERM.
    env_vars = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
    if is_local(address):
        env_vars["SHIPYARD_HOME"] = str(home())
    else:
        problems = remote_problems(spec)
        if problems:
            raise SubmitError("this spec cannot run on a remote cluster:\n  " + "\n  ".join(problems))
    raw = spec.to_dict(secrets=True)
    dropped = [f"{b}.{k}" for b, k in sorted(SECRETS) if raw[b][k] is not None]
    if dropped:
        warnings.warn(f"{', '.join(dropped)} are not sent to the cluster; its nodes must have the "
                      "credentials in their environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
                      stacklevel=2)
    submission_id = submission_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    with tempfile.TemporaryDirectory(prefix="shipyard-submit-") as tmp:
        (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(spec.to_dict(secrets=False), sort_keys=False))
        runtime_env = {
            "working_dir": tmp,
            "py_modules": [str(Path(shipyard.__file__).parent), str(Path(shipyard_models.__file__).parent)],
            "env_vars": env_vars,
        }
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=f"python -m shipyard.cli run job.yaml --run-name {submission_id}",
                    submission_id=submission_id, runtime_env=runtime_env,
                    entrypoint_num_cpus=entrypoint_cpus,
                    metadata={"shipyard.job": spec.name, "shipyard.family": spec.family})
            except Exception as e:
                # A cluster that just came up answers 500 until its job agents have registered.
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise SubmitError(f"the cluster at {address} refused the job: {_clean(e)}") from None


def _clean(e: BaseException) -> str:
    """An SDK error as text (Ray's messages never include request headers, so never the token)."""
    return str(e).strip() or type(e).__name__
