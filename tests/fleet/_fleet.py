"""Helpers for the fleet provisioning tests: the real CLI in-process, a fleet directory, mTLS paho clients."""

from __future__ import annotations

import contextlib
import io
import re
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeguard.cli import main


def cli(*argv: str | Path) -> tuple[int, str, str]:
    """``edgeguard ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def ok(*argv: str | Path) -> str:
    code, out, err = cli(*argv)
    assert code == 0, f"edgeguard {' '.join(map(str, argv))} -> {code}: {err}"
    return out


def make_fleet(
    root: Path, *, broker_port: int = 8883, api_port: int = 8780, groups: tuple[str, ...] = ()
) -> str:
    """``fleet init`` into ``root``; returns the fleet key id it prints."""
    args: list[str | Path] = [
        "fleet",
        "init",
        root,
        "--name",
        "plant",
        "--broker",
        f"127.0.0.1:{broker_port}",
    ]
    for g in groups:
        args += ["--group", g]
    out = ok(*args, "--api-port", str(api_port))
    m = re.search(r"fleet key id ([0-9a-f]{16})", out)
    assert m, out
    return m.group(1)


class TlsClient:
    """A paho client with a fleet client certificate, recording what it receives; connect outcome kept."""

    def __init__(self, host: str, port: int, *, ca: Path, cert: Path, key: Path, name: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.connected: bool | None = None
        self.subacks = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        self.client.tls_set(
            ca_certs=str(ca), certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect_fail = self._on_fail
        self.client.on_disconnect = self._on_disconnect
        try:
            self.client.connect(host, port, keepalive=10)
        except (OSError, ssl.SSLError):
            self.connected = False
            return
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        with self.cond:
            self.connected = not rc.is_failure
            self.cond.notify_all()

    def _on_fail(self, *_a: Any) -> None:
        with self.cond:
            self.connected = False
            self.cond.notify_all()

    def _on_disconnect(self, *_a: Any) -> None:
        with self.cond:
            if self.connected is None:
                self.connected = False
            self.cond.notify_all()

    def _on_subscribe(self, *_a: Any) -> None:
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.connected is not None, timeout)
            return bool(self.connected)

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        with self.cond:
            want = self.subacks + 1
        self.client.subscribe(topic, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: self.subacks >= want, timeout), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait_topic(self, topic: str, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout)

    def wait_message(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: (topic, payload) in self.messages, timeout)

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.messages), timeout)

    def topics(self) -> list[str]:
        with self.cond:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
