"""Shared fixtures: one real local Ray cluster per test session, an isolated Shipyard home."""
from __future__ import annotations

import os
import tempfile

# Before anything imports shipyard: embedded state (MLflow db, runs, caches) goes to a temp dir.
os.environ.setdefault("SHIPYARD_HOME", tempfile.mkdtemp(prefix="shipyard-test-home-"))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread in the test process: CI has 2 cores, shared with the Ray workers the tests
# start, and two threads on tiny tensors only add contention (tests that compare against a Serve
# replica or a Ray worker need the same kernels anyway, and those run with one thread).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (4 logical CPUs on any machine) shared by the whole session."""
    import ray
    from shipyard.cluster import connect
    connect(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shipyard_home():
    from shipyard.cluster import home
    return home()
