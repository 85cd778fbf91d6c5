"""moto's S3 server for the integration tests (imported by conftest.py and tests; no package)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SECRET = "s3cr3t-never-logged"
"""The secret access key of the moto server's test credentials; tests check it is never stored."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 server on a free loopback port, wait for it, create the bucket `shipyard`;
    return (process, endpoint URL)."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, log.read_text() if log else "moto died"
            time.sleep(0.3)
    import boto3
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIATEST",
                 aws_secret_access_key=SECRET).create_bucket(Bucket="shipyard")
    return proc, endpoint
