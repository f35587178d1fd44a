"""tools/fleet_sim.py as a child process for tests: start N devices, send fault commands, read its lines."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from tests.support.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
SIM = ROOT / "tools" / "fleet_sim.py"


def edgeguard(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "edgeguard", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


class SimFleet:
    def __init__(self, broker: MosquittoBroker, count: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SIM), str(count), "--broker", f"{broker.host}:{broker.port}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The next line starting with ``prefix`` (other lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"simulator said no {prefix!r} in {timeout} s; said: {self.seen[-5:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
