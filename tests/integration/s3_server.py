"""moto's S3 server for the integration tests (imported by conftest.py and tests; no package)."""
from __future__ import annotations

import socket

SECRET = "s3cr3t-never-logged"
"""The secret access key of the moto server's test credentials; tests check it is never stored."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
