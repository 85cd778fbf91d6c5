"""moto's S3 server for the integration tests (imported by conftest.py and tests; no package)."""
from __future__ import annotations

import random
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
    """A free loopback port for a server a test starts (moto, MLflow, Ray Serve's proxy).

    Not one the kernel picks (bind to port 0): those come from the ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 here), which every outgoing connection also
    draws its source port from, and Ray opens many; between this check and the server's bind one took
    the port (seen once in CI: Serve's proxy "Failed to bind to address", every serve test failing).
    So a random free port between Ray's default worker ports (10002-19999) and the ephemeral range."""
    for port in random.Random().sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32767")


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
