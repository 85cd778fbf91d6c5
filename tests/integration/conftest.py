"""Fixtures shared by the integration tests: a real S3 API (moto's server on 127.0.0.1)."""
from __future__ import annotations

import pytest
from s3_server import SECRET, start_moto


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with a bucket `shipyard`; yields the endpoint URL."""
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def aws_env(s3, monkeypatch):
    """The usual AWS environment variables pointing at the moto server (driver-side tools read them)."""
    for k, v in {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
