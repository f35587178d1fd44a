"""The sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeguard.watchdog import SystemdNotifier, WatchdogChain


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()


def _recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_ready_status_watchdog_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_enabled and n.kick_interval_s == 2.0  # half of WATCHDOG_USEC
    assert n.ready("model yolov8n v3 verified")
    msg = _recv(s)
    assert "READY=1" in msg.splitlines()
    assert f"MAINPID={os.getpid()}" in msg
    assert "STATUS=model yolov8n v3 verified" in msg
    assert n.kick()
    assert _recv(s) == "WATCHDOG=1"
    assert n.status("serving:\n 3 inferences")
    assert _recv(s) == "STATUS=serving: 3 inferences"  # one readable line for systemctl status
    assert n.stopping("stopping")
    assert _recv(s).splitlines()[0] == "STOPPING=1"
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"edgeguard-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        n = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert "READY=1" in _recv(s)
    finally:
        s.close()


def test_watchdog_pid_mismatch_disables_kicks(notify_socket: tuple[socket.socket, str]) -> None:
    _, path = notify_socket
    n = SystemdNotifier(
        environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=4242
    )
    assert not n.watchdog_enabled and not n.kick()


def test_no_socket_is_a_noop() -> None:
    n = SystemdNotifier(environ={})
    assert not n.enabled and not n.ready() and not n.kick() and not n.stopping()


def test_vanished_socket_counts_error_not_raise(tmp_path: Path) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1000000"})
    assert not n.kick()
    assert n.errors == 1


def test_chain_kicks_only_while_healthy(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    t = [0.0]
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    chain = WatchdogChain(notifier=n, clock=lambda: t[0])
    assert chain.kinds == ["systemd"]
    assert chain.tick(healthy=True) == 1
    assert _recv(s) == "WATCHDOG=1"
    t[0] = 0.5
    assert chain.tick(healthy=True) == 0  # interval (1 s = half of 2 s) not yet due
    t[0] = 1.1
    assert chain.tick(healthy=True) == 1
    assert _recv(s) == "WATCHDOG=1"
    # A failing health check stops every kick, however long it lasts.
    for step in range(5):
        t[0] = 2.5 + step
        assert chain.tick(healthy=False, reason="inference stalled") == 0
    s.settimeout(0.2)
    with pytest.raises(TimeoutError):
        s.recv(100)
    assert chain.withheld == 5
    assert chain.snapshot()["reason"] == "inference stalled"
    t[0] = 10.0
    assert chain.tick(healthy=True) == 1
