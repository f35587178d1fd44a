"""The supervisor stays lean: it spawns and watches the worker, so it holds the standard library and the
watchdog package, never the worker's stack (numpy, onnxruntime, aiohttp, paho: tens of MiB each on a board
with 512 MiB). The real service as a child process; its modules read through the supervisor's debug seam
(paho is pure Python, so /proc/PID/maps could not show it), its memory from /proc/PID/status."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from edgeguard.service._supervisor_main import MODULES_ENV
from tests.service._env import STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker

HEAVY = ("numpy", "onnxruntime", "aiohttp", "paho", "cryptography", "serial", "PIL", "edgeguard.engine",
         "edgeguard.bundle", "edgeguard.link", "edgeguard.outbox", "edgeguard.service.config")
SUPERVISOR_RSS_MIB = 20  # issue 13's goal for the supervisor alone
GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_supervisor_loads_no_worker_stack_and_stays_small(tmp_path: Path) -> None:
    modules_file = tmp_path / "supervisor-modules.txt"
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start(env={MODULES_ENV: str(modules_file)})
        try:
            dev.wait_ready()
            dev.wait(modules_file.exists, 10, "the supervisor's module list")
            assert dev.proc is not None
            dev.wait(lambda: dev.worker_pid() is not None, 30, "the worker's health")
            # The process systemd started (same pid after the lean re-exec) is the supervisor.
            worker = dev.worker_pid()
            assert worker is not None and worker != dev.proc.pid
            modules = modules_file.read_text().split()
            assert "edgeguard.service._supervisor" in modules and "edgeguard.watchdog" in modules
            loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY or
                            any(m.startswith(h + ".") for h in HEAVY))
            assert loaded == [], loaded
            rss = _rss_mib(dev.proc.pid)
            print(f"supervisor RSS {rss:.1f} MiB")
            assert rss <= SUPERVISOR_RSS_MIB, f"supervisor RSS {rss:.1f} MiB"
            # The debug seam is the supervisor's own: the worker does not inherit it.
            env = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            assert not [e for e in env if e.startswith(MODULES_ENV.encode())]
        finally:
            assert dev.stop() == 0


def _served(dev: Device) -> bool:
    try:
        return dev.request("POST", "/v1/infer", GOOD, timeout=5)[0] == 200
    except OSError:
        return False  # not listening yet


class _SilentBroker:
    """A TCP port that accepts connections (the kernel's backlog) and never answers MQTT: each connection
    attempt of the link waits for a CONNACK that never comes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])


def test_serving_does_not_wait_for_the_broker(tmp_path: Path) -> None:
    silent = _SilentBroker()
    try:
        dev = Device(root=tmp_path, broker=silent)  # type: ignore[arg-type]
        # The link would wait 120 s for its first attempt; serving must not (60 s: room for a busy machine).
        dev.provision(tiny_bundle(tmp_path), link_extra="startup_wait_s = 120.0\nconnect_timeout_s = 120.0\n")
        dev.start()
        try:
            dev.wait(lambda: _served(dev), 60, "serving without a broker")
            health = dev.request("GET", "/v1/health", token=STATUS)[1]
            assert health["outbox"]["depth"] >= 1  # the result waits in the outbox for the broker
        finally:
            assert dev.stop() == 0
    finally:
        silent.sock.close()


def _spares_ready(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(m) for m in re.findall(r"spare worker (\d+) ready to take over", text)]


def test_spare_worker_takes_over_at_once_and_is_replaced(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), service_extra="spare_worker = true\n")
        dev.start()
        log = tmp_path / "service.log"
        try:
            dev.wait_ready()
            dev.wait(lambda: _spares_ready(log), 60, "a spare worker ready")
            spare = _spares_ready(log)[0]
            serving = dev.worker_pid()
            assert serving is not None and serving != spare
            os.kill(serving, signal.SIGKILL)
            t0 = time.monotonic()
            dev.wait(lambda: _served(dev), 30, "serving again")
            took = time.monotonic() - t0
            assert dev.worker_pid() == spare  # the spare took over: no fresh worker had to load the model
            assert took < 2.0, f"takeover took {took:.2f} s"
            state = json.loads((tmp_path / "state/supervisor.json").read_text())
            assert state["starts"] == 2 and state["history"][-1]["reason"] == "crash: signal 9", state
            dev.wait(lambda: len(_spares_ready(log)) >= 2, 60, "a new spare")
        finally:
            assert dev.stop() == 0
        # No worker outlives the service, the spare included.
        assert not [p for p in _spares_ready(log) if Path(f"/proc/{p}").exists()]
