"""A site for tests: one real mosquitto, N real device services (``edgeguard run``) in one group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.service._env import Device, tiny_bundle
from tests.support.broker import MosquittoBroker

FLEET = "test"
GROUP = "line-1"
KEEPALIVE_S = 2  # the broker calls a silent member offline after ~1.5 x this


def site_toml(*, check_s: float = 0.25, streams: str = "", extra: str = "") -> str:
    return f"""
[site]
enabled = true
group = "{GROUP}"
keepalive_s = {KEEPALIVE_S}
check_s = {check_s}
receive_maximum = 8
queue_size = 32
leave_at = 24
rejoin_at = 8
{extra}
{streams}"""


def make_device(
    root: Path, broker: MosquittoBroker, dev_id: str, *, site: str, bundle: bool = True
) -> Device:
    root.mkdir(parents=True, exist_ok=True)
    dev = Device(root=root, broker=broker)
    dev.provision(tiny_bundle(root) if bundle else b"", extra=site)
    dev.config.write_text(dev.config.read_text().replace('id = "dev-1"', f'id = "{dev_id}"', 1))
    return dev


def kill9(dev: Device) -> None:
    """SIGKILL the supervisor and its worker at once (a power cut, as far as the broker can tell)."""
    assert dev.proc is not None
    pid = dev.worker_pid()
    with contextlib.suppress(ProcessLookupError):
        os.kill(dev.proc.pid, signal.SIGKILL)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    dev.proc.wait(30)
    dev.proc = None
    if dev.notify is not None:
        dev.notify.close()
        dev.notify = None


class Watch:
    """Every retained/live message under the fleet's topics, decoded (heartbeats, member status, leases)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.lock = threading.Condition()
        self.heartbeats: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, list[dict[str, Any]]] = {}
        self.results: list[dict[str, Any]] = []
        self.log: list[tuple[float, str, dict[str, Any]]] = []  # (monotonic arrival, topic, doc)
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._c.on_message = self._on
        self._c.connect("127.0.0.1", broker.port)
        self._c.subscribe(f"edgeguard/v1/{FLEET}/#", qos=1)
        self._c.loop_start()

    def _on(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        parts = msg.topic.split("/")
        with self.lock:
            if parts[-1] != "heartbeat":
                self.log.append((time.monotonic(), msg.topic, doc))
            if parts[3] == "group" and parts[5] == "member":
                self.members[parts[6]] = doc
            elif parts[3] == "group" and parts[5] == "lease":
                self.leases.setdefault(parts[6], []).append(doc)
            elif parts[-1] == "heartbeat":
                self.heartbeats[parts[3]] = doc
            elif parts[-1] == "results":
                self.results.append(doc["data"])
            self.lock.notify_all()

    def group_state(self, dev: str) -> dict[str, Any]:
        with self.lock:
            hb = self.heartbeats.get(dev, {})
        return dict(hb.get("sources", {}).get("group", {}))

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@contextlib.contextmanager
def watching(broker: MosquittoBroker) -> Iterator[Watch]:
    w = Watch(broker)
    try:
        yield w
    finally:
        w.close()
