"""``fleet send``'s MQTT side: find the targets, publish a signed command to each, collect verified answers.

Targets: a device id is published to as given. ``group:G`` and ``all`` go to the devices whose retained birth
status (``edgeguard/v1/<fleet>/+/status``) says they are online (and, for a group, lists it in ``groups``);
the command is signed once and published on each of their own ``cmd`` topics, because the broker's ACL lets a
device read only its own. Offline devices are reported as skipped, not queued for later: a command that
arrives hours late would usually be refused as expired anyway.

Retained statuses are complete when a second SUBACK arrives: the broker sends a subscription's retained
messages (subscribed at QoS 0, so no in-flight window holds them back) right after its SUBACK, and the
SUBACK of the next subscription after those.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.errors import LinkError
from edgeguard.link import LinkConfig, tls_context

from ._sign import Answer, SignedCommand, check_answer, learned_key

__all__ = ["CommandSender", "SendReport", "Delivery"]

_STATUS_MAX = 64 * 1024
_ANSWER_MAX = 4 * 1024 * 1024


@dataclass
class Delivery:
    device: str
    sent_at: float
    answer: Answer | None = None
    latency_s: float | None = None
    forged: list[Answer] = field(default_factory=list)


@dataclass
class SendReport:
    command: SignedCommand
    deliveries: dict[str, Delivery]
    skipped: dict[str, str]  # device -> why it was not sent to

    @property
    def all_ok(self) -> bool:
        return bool(self.deliveries) and all(
            d.answer is not None and d.answer.ok for d in self.deliveries.values()
        )


class CommandSender:
    def __init__(
        self,
        *,
        broker: LinkConfig,
        fleet: str,
        pinned: Mapping[str, Ed25519PublicKey] | None = None,
        client_id: str = "",
    ) -> None:
        self.fleet = fleet
        self.base = f"edgeguard/v1/{fleet}/"
        self.pinned = dict(pinned or {})
        self.statuses: dict[str, dict[str, Any]] = {}
        self._broker = broker
        self._answers: queue.Queue[tuple[str, bytes, float]] = queue.Queue()
        self._lock = threading.Lock()
        self._subacks: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self._connect_rc: Any = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311 if broker.protocol == "3.1.1" else mqtt.MQTTv5,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            client.tls_set_context(tls_context(broker))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- paho callbacks (paho's thread)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._connect_rc = rc
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any = None) -> None:
        with self._lock:
            ev = self._subacks.get(mid)
        if ev is not None:
            ev.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        rest = msg.topic.removeprefix(self.base)
        device, _, kind = rest.partition("/")
        if kind == "status" and len(msg.payload) <= _STATUS_MAX:
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(doc, dict):
                with self._lock:
                    self.statuses[device] = doc
        elif kind == "cmd/resp" and len(msg.payload) <= _ANSWER_MAX:
            self._answers.put((device, bytes(msg.payload), time.perf_counter()))

    # -- public face
    def connect(self, timeout: float = 10.0) -> None:
        b = self._broker
        try:
            self._client.connect(b.host, b.port, keepalive=b.keepalive_s)
        except OSError as exc:
            raise LinkError(f"cannot connect to {b.host}:{b.port}: {exc.strerror or exc}") from None
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            # A request/answer exchange of small packets: Nagle's algorithm with delayed ACKs would add
            # ~40 ms to each round trip.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client.loop_start()
        v5 = b.protocol != "3.1.1"
        if not self._connected.wait(timeout):
            self.close()
            hint = ""
            if v5:  # RabbitMQ's MQTT plugin before 3.13 closes an MQTT 5 CONNECT without any answer
                hint = " (a broker that speaks only MQTT 3.1.1 may close an MQTT 5 connection unanswered: "
                hint += "try --protocol 3.1.1)"
            raise LinkError(f"no CONNACK from {b.host}:{b.port} within {timeout:g} s{hint}")
        if getattr(self._connect_rc, "is_failure", False):
            self.close()
            hint = ""
            if v5 and getattr(self._connect_rc, "value", None) in (1, 132):  # unacceptable protocol version
                hint = " (the broker speaks only MQTT 3.1.1, as NATS does: try --protocol 3.1.1)"
            raise LinkError(f"broker {b.host}:{b.port} refused the connection: {self._connect_rc}{hint}")
        # statuses first (QoS 0), then answers: the second SUBACK is the barrier (module docstring)
        self._subscribe(self.base + "+/status", 0, timeout)
        self._subscribe(self.base + "+/cmd/resp", 1, timeout)

    def _subscribe(self, topic: str, qos: int, timeout: float) -> None:
        ev = threading.Event()
        with self._lock:  # registered before the SUBACK can arrive (paho's thread takes this lock too)
            rc, mid = self._client.subscribe(topic, qos=qos)
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise LinkError(f"cannot subscribe to {topic}: {mqtt.error_string(rc)}")
            self._subacks[mid] = ev
        if not ev.wait(timeout):
            raise LinkError(f"no SUBACK for {topic} within {timeout:g} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def targets(self, target: tuple[str, str]) -> tuple[list[str], dict[str, str]]:
        """The devices to publish to, and those skipped with why."""
        kind, value = target
        if kind == "device":
            return [value], {}
        chosen, skipped = [], {}
        with self._lock:
            statuses = dict(self.statuses)
        for device, st in sorted(statuses.items()):
            groups = st.get("groups")
            if kind == "group" and not (isinstance(groups, list) and value in groups):
                continue
            if st.get("state") != "online":
                skipped[device] = f"offline (status {st.get('state')!r})"
                continue
            if "signing_key" not in st:  # announced only with [commands] enabled
                skipped[device] = "commands not enabled (no signing_key in its status)"
                continue
            chosen.append(device)
        return chosen, skipped

    def learned(self) -> dict[str, Ed25519PublicKey]:
        with self._lock:
            statuses = dict(self.statuses)
        out = {}
        for device, st in statuses.items():
            key = learned_key(st)
            if key is not None:
                out[device] = key
        return out

    def send(
        self,
        cmd: SignedCommand,
        *,
        timeout: float,
        on_answer: Callable[[Answer, float | None], None] | None = None,
        devices: Sequence[str] | None = None,
    ) -> SendReport:
        """Publish ``cmd`` to its targets (or exactly to ``devices``' topics: each device still checks the
        signed target itself) and wait up to ``timeout`` for a verified answer from each."""
        if devices is None:
            devices, skipped = self.targets(cmd.target)
        else:
            skipped = {}
        report = SendReport(cmd, {}, skipped)
        for device in devices:
            report.deliveries[device] = Delivery(device, time.perf_counter())
            self._client.publish(f"{self.base}{device}/cmd", cmd.data, qos=1)
        deadline = time.monotonic() + timeout
        waiting = set(devices)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                device, data, at = self._answers.get(timeout=left)
            except queue.Empty:
                break
            d = report.deliveries.get(device)
            if d is None:
                continue
            ans = check_answer(device, data, pinned=self.pinned, learned=self.learned())
            nonce = ans.doc.get("nonce")
            if nonce != cmd.nonce and not (nonce is None and ans.doc.get("check") == "too large"):
                continue  # another command's answer (another operator, or an earlier one of ours)
            latency = at - d.sent_at
            if not ans.trusted:
                d.forged.append(ans)
            elif d.answer is None:
                d.answer, d.latency_s = ans, latency
                waiting.discard(device)
            if on_answer is not None:
                on_answer(ans, latency)
        return report
