"""Fixtures shared by the integration tests: a real S3 API (moto's server on 127.0.0.1)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from s3_server import SECRET, free_port


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with a bucket `shipyard`; yields the endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.3)
    import boto3
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIATEST",
                 aws_secret_access_key=SECRET).create_bucket(Bucket="shipyard")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


