"""Run ``edgeguard run`` as a child process for a short session (the demo, benchmarks, integration checks).

The child gets its own ``NOTIFY_SOCKET``, so :meth:`ServiceSession.start` returns exactly when the service
sent ``READY=1`` (model verified and self-tested), like systemd would see it; requests go through the real
local API with a bearer token.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from edgeguard.errors import EdgeGuardError

__all__ = ["ServiceSession"]


class ServiceSession:
    """``with ServiceSession(config, api_port=..., token=...) as s: s.request("POST", "/v1/infer", png)``."""

    def __init__(self, config: Path, *, api_port: int, token: str, log_path: Path | None = None) -> None:
        self.config = config
        self.api_port = api_port
        self.token = token
        self.log_path = log_path or config.with_name("service.log")
        self.notifications: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="eg-session-"))
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, *, timeout: float = 180.0) -> None:
        path = self._dir / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        env.pop("WATCHDOG_USEC", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "run", "-c", str(self.config)],
            env=env,
            stdout=self._log,
            stderr=self._log,
        )
        threading.Thread(target=self._read_notifications, daemon=True).start()
        end = time.monotonic() + timeout
        while not any("READY=1" in n for n in self.notifications):
            if self._proc.poll() is not None:
                raise EdgeGuardError(f"the service exited with {self._proc.returncode}; see {self.log_path}")
            if time.monotonic() > end:
                self.stop()
                raise EdgeGuardError(f"the service was not ready within {timeout:g} s; see {self.log_path}")
            time.sleep(0.05)

    def _read_notifications(self) -> None:
        sock = self._sock
        while sock is not None and sock.fileno() >= 0:
            try:
                self.notifications.append(sock.recv(4096).decode("utf-8", "replace"))
            except TimeoutError:
                continue
            except OSError:
                return

    @property
    def status(self) -> str:
        """The latest STATUS= line the service sent (what `systemctl status` would show)."""
        for n in reversed(self.notifications):
            for line in n.splitlines():
                if line.startswith("STATUS="):
                    return line[7:]
        return ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        ctype: str = "application/json",
        timeout: float = 60.0,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        try:
            conn.request(
                method,
                path,
                body=body,
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": ctype},
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(data) if data else None

    def stop(self, *, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: in-flight work finishes, offline status published); the exit code."""
        rc = 0
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
            rc = self._proc.returncode
            self._proc = None
        time.sleep(0.3)  # let the reader collect STOPPING=1
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def __enter__(self) -> ServiceSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
