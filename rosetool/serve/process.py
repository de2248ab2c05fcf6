"""`rosetool serve` as a child process on a free loopback port: started, awaited, drained.

The bench's `rosetool-server` backend and the tests start servers this way, so what they measure
and check is the real command (CLI, uvicorn, signals), not an in-process shortcut.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from rosetool.errors import RosetoolError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], startup_timeout_s: float = 300.0):
        self.args, self.startup_timeout_s = args, startup_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="rosetool-serve-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-c", "from rosetool.cli.app import main; main()", "serve", *self.args,
               "--host", HOST, "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(timeout_s=5)
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise RosetoolError(f"rosetool serve did not become healthy on {self.base_url}: {tail[0]}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout_s`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
