"""Where the Ray work runs: an embedded local cluster by default, or an existing one.

`connect(address=None)`: no address starts a fresh local cluster in this process
(`address="local"`, so a stale `/tmp/ray/ray_current_cluster` from an earlier `ray start` cannot
hijack the run); an address (`--address`, or `RAY_ADDRESS`) joins that cluster instead.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import ray

HOME = Path(os.environ.get("SHIPYARD_HOME", ".shipyard"))
"""Embedded state: MLflow's sqlite store, checkpoints, data caches. Relative to the working dir."""


def home() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    return HOME.resolve()


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Inside a job submitted through the Jobs API the job's runtime env already carries the code
    # to every node (`shipyard submit`: py_modules); a local PYTHONPATH would only conflict with it.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = None if in_job else {"env_vars": {"PYTHONPATH": _code_paths()}}
    if address:
        from urllib.parse import urlsplit
        host = urlsplit(address if "://" in address else f"ray://{address}").hostname
        if env is not None and host in ("127.0.0.1", "localhost", "::1"):
            # A cluster on this machine (e.g. `ray start` here): its workers (a sweep's trials) keep
            # embedded state where this process does, as `shipyard submit` arranges for jobs.
            env["env_vars"]["SHIPYARD_HOME"] = str(home())
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # Logical CPUs beyond the physical ones let a worker group, the driver's helpers and a
    # sweep's trials co-exist on a laptop; torch threads are pinned per worker anyway.
    cpus = num_cpus or max(os.cpu_count() or 1, 4)
    # Ray's processes inherit an ignored SIGINT, so a Ctrl-C in the terminal (sent to the whole
    # process group) reaches only the driver, which then stops the workers cleanly.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        # The dashboard hosts the state API that Ray Train's placement-group cleaner polls (ray#54305).
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=env, log_to_driver=True, configure_logging=False)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _code_paths() -> str:
    """Source folders of both packages, so workers import the same code as the driver."""
    import shipyard
    import shipyard_models
    paths = [str(Path(shipyard.__file__).resolve().parents[1]),
             str(Path(shipyard_models.__file__).resolve().parents[1])]
    extra = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([extra] if extra else []))
