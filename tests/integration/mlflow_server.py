"""A real `mlflow server` subprocess for the integration tests (imported by tests; no package)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from s3_server import free_port


class MlflowServer:
    """A real `mlflow server` subprocess that can be killed and restarted on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # own group: kill it all
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    raise RuntimeError(f"mlflow server did not start: "
                                       f"{(self.root / f'server-{self.starts}.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server's whole process group, then wait until the port refuses connections."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"port {self.port} still accepts connections after the kill")
