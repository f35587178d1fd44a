"""The sender's side of group input: publish with a correlation id, wait for the result, retry what is lost.

A gateway (or a test, or tools/bench_sites.py) feeds a group with :class:`GroupClient`. Each input carries its
correlation id in MQTT 5 Correlation Data and its ``attempt`` in a user property. An input with no result
after ``retry_after_s``, or unanswered when a member's status turns offline, is published again with the same
id and ``attempt`` + 1: that is what brings the inputs a dead member had taken (which mosquitto discards with
its session, docs/sites.md) to a live one. A result whose correlation id was already answered is a duplicate:
counted here and marked by the device (``redelivered``); the first result stands.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ._config import group_topic

__all__ = ["GroupClient", "Answer"]

_MAX_RESULT_BYTES = 1 << 20


@dataclass
class Answer:
    correlation_id: str
    sent_at: float
    attempts: int = 1
    last_sent: float = 0.0
    result: dict[str, Any] | None = None
    answered_at: float | None = None
    duplicates: list[dict[str, Any]] = field(default_factory=list)


class GroupClient:
    """Publishes inputs to ``edgeguard/v1/<fleet>/group/<group>/input`` and collects results from every
    device's ``results`` topic (matched by correlation id). ``tls``: a client context (mutual TLS).
    Thread-safe; ``clock`` is injectable."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str,
        group: str,
        retry_after_s: float = 10.0,
        client_id: str | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet, self.group = fleet, group
        self.topic = group_topic(fleet, group, "input")
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._lock = threading.Condition()
        self.answers: dict[str, Answer] = {}
        self.members: dict[str, dict[str, Any]] = {}  # device -> last member status
        self.retries = 0
        self.offline_seen = 0
        self._payloads: dict[str, bytes] = {}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5
        )
        self._client.max_inflight_messages_set(100)
        if tls is not None:  # e.g. an operator certificate on the fleet's broker (docs/sites.md)
            self._client.tls_set_context(tls)
        self._client.on_message = self._on_message
        self._connected = threading.Event()
        self._client.on_connect = lambda *_a: self._connected.set()
        self._host, self._port = host, port

    def __enter__(self) -> GroupClient:
        self._client.connect(self._host, self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self._connected.wait(30):
            raise ConnectionError(f"no CONNACK from {self._host}:{self._port}")
        results = f"edgeguard/v1/{self.fleet}/+/results"
        self._client.subscribe([(results, 1), (group_topic(self.fleet, self.group, "member/+"), 1)])
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def send(self, correlation_id: str, payload: bytes) -> None:
        with self._lock:
            now = self._clock()
            self.answers[correlation_id] = Answer(correlation_id, now, last_sent=now)
            self._payloads[correlation_id] = payload
        self._publish(correlation_id, payload, 1)

    def _publish(self, cid: str, payload: bytes, attempt: int) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = cid.encode()
        props.UserProperty = [("attempt", str(attempt))]
        self._client.publish(self.topic, payload, qos=1, properties=props)

    def retry_due(self, *, all_unanswered: bool = False) -> int:
        """Publish again every unanswered input older than ``retry_after_s`` (or all unanswered ones)."""
        now = self._clock()
        due: list[tuple[str, int]] = []
        with self._lock:
            for a in self.answers.values():
                if a.result is None and (all_unanswered or now - a.last_sent >= self.retry_after_s):
                    a.attempts += 1
                    a.last_sent = now
                    due.append((a.correlation_id, a.attempts))
            self.retries += len(due)
        for cid, attempt in due:
            self._publish(cid, self._payloads[cid], attempt)
        return len(due)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if len(msg.payload) > _MAX_RESULT_BYTES:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if msg.topic.endswith("/results"):
            self._on_result(doc)
        elif "/member/" in msg.topic:
            dev = msg.topic.rsplit("/", 1)[1]
            with self._lock:
                was = self.members.get(dev, {}).get("state")
                self.members[dev] = doc
            if doc.get("state") == "offline" and was == "online":
                with self._lock:
                    self.offline_seen += 1
                self.retry_due(all_unanswered=True)  # what the dead member held comes back now

    def _on_result(self, doc: dict[str, Any]) -> None:
        data = doc.get("data", doc)
        cid = data.get("correlation_id") if isinstance(data, dict) else None
        with self._lock:
            a = self.answers.get(cid) if isinstance(cid, str) else None
            if a is None or not isinstance(data, dict):
                return
            if a.result is None:
                a.result, a.answered_at = data, self._clock()
            else:
                a.duplicates.append(data)
            self._lock.notify_all()

    def unanswered(self) -> list[str]:
        with self._lock:
            return [c for c, a in self.answers.items() if a.result is None]

    def duplicates(self) -> int:
        with self._lock:
            return sum(len(a.duplicates) for a in self.answers.values())

    def wait_all(self, timeout: float, *, poll_s: float = 0.5) -> bool:
        """Wait until every input sent has a result, retrying due ones meanwhile."""
        end = self._clock() + timeout
        while self._clock() < end:
            with self._lock:
                if all(a.result is not None for a in self.answers.values()):
                    return True
                self._lock.wait(poll_s)
            self.retry_due()
        return not self.unanswered()
