"""What RabbitMQ's MQTT plugin and NATS's MQTT support do with what EdgeGuard uses, found by experiment on the
versions installed here (docs/fleet.md, "What EdgeGuard needs from a broker", is the table of these answers),
and the clear message EdgeGuard gives where it depends on something a broker lacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.errors import LinkError
from edgeguard.fleet.commands import CommandSender
from edgeguard.link import LinkConfig
from tests.support.brokers import ExternalBroker


class Probe:
    """A paho client recording CONNACK, SUBACK codes, messages (with the retain flag) and disconnects."""

    def __init__(self, broker: ExternalBroker, *, protocol: int = mqtt.MQTTv311, clean: bool = True,
                 client_id: str | None = None) -> None:
        self.cond = threading.Condition()
        self.connack: Any = None
        self.suback: list[int] = []
        self.messages: list[tuple[str, bytes, bool, int]] = []
        self.disconnects = 0
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{time.monotonic_ns()}",
            protocol=protocol,
            clean_session=clean if protocol != mqtt.MQTTv5 else None,
        )
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.connect(broker.host, broker.port, keepalive=10)
        self.c.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[Any], _p: Any = None) -> None:
        with self.cond:
            self.suback += [int(r.value) for r in rcs]
            self.cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain), int(m.qos)))
            self.cond.notify_all()

    def _on_disconnect(self, *_a: Any) -> None:
        with self.cond:
            self.disconnects += 1
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float = 20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def connected(self) -> None:
        assert self.wait(lambda: self.connack is not None), "no CONNACK"
        assert not self.connack.is_failure, self.connack

    def subscribe(self, topic: str, qos: int = 1) -> None:
        n = len(self.suback)
        self.c.subscribe(topic, qos=qos)
        assert self.wait(lambda: len(self.suback) > n), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        deadline = time.monotonic() + 10
        while not info.is_published() and time.monotonic() < deadline and self.disconnects == 0:
            time.sleep(0.02)
        return info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def probes(clusterable: ExternalBroker) -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def _probe(made: list[Probe], broker: ExternalBroker, **kw: Any) -> Probe:
    p = Probe(broker, **kw)
    made.append(p)
    return p


def test_mqtt5_is_refused_and_each_edgeguard_client_says_what_to_do(
    clusterable: ExternalBroker, probes: list[Probe]
) -> None:
    p = _probe(probes, clusterable, protocol=mqtt.MQTTv5)
    if clusterable.kind == "nats":
        # 3.1.1's answer: CONNACK "unacceptable protocol version"; the device link falls back on it
        assert p.wait(lambda: p.connack is not None)
        assert p.connack.is_failure and p.connack.value in (1, 132), p.connack
    else:
        # RabbitMQ 3.10 cannot parse an MQTT 5 CONNECT and closes the connection without any CONNACK
        assert p.wait(lambda: p.disconnects > 0)
        assert p.connack is None
    sender = CommandSender(broker=LinkConfig(host=clusterable.host, port=clusterable.port), fleet="f")
    with pytest.raises(LinkError, match=r"try --protocol 3\.1\.1"):
        sender.connect(timeout=3)


def test_retained_status_on_exact_and_wildcard_subscriptions(
    clusterable: ExternalBroker, probes: list[Probe]
) -> None:
    fleet = f"ret{time.monotonic_ns()}"
    pub = _probe(probes, clusterable)
    pub.connected()
    assert pub.publish(f"edgeguard/v1/{fleet}/d1/status", b'{"state":"online"}', retain=True)
    got = {}
    prefix = f"edgeguard/v1/{fleet}/"
    for flt in (prefix + "d1/status", prefix + "+/status", prefix + "#"):
        sub = _probe(probes, clusterable)
        sub.connected()
        sub.subscribe(flt)
        sub.wait(lambda s=sub: bool(s.messages), 2.0)  # retained ones come right behind the SUBACK
        got[flt] = [r for _t, _p, r, _q in sub.messages]
    assert got[f"edgeguard/v1/{fleet}/d1/status"] == [True]
    wildcard = [True] if clusterable.kind == "nats" else []  # RabbitMQ: never on a wildcard subscription
    assert got[f"edgeguard/v1/{fleet}/+/status"] == wildcard
    assert got[f"edgeguard/v1/{fleet}/#"] == wildcard
    assert pub.publish(f"edgeguard/v1/{fleet}/d1/status", b"", retain=True)  # an empty retained one clears it


def test_qos2_dots_in_topics_and_persistent_sessions(
    clusterable: ExternalBroker, probes: list[Probe]
) -> None:
    fleet = f"q{time.monotonic_ns()}"
    sub = _probe(probes, clusterable)
    sub.connected()
    sub.subscribe(f"edgeguard/v1/{fleet}/#", qos=2)
    assert sub.suback == [1]  # both grant at most QoS 1 (EdgeGuard uses 0 and 1 only)
    q2 = _probe(probes, clusterable)
    q2.connected()
    accepted = q2.publish(f"edgeguard/v1/{fleet}/x", b"q2", qos=2)
    # RabbitMQ takes a QoS 2 publish (delivered at 1); NATS 2.9 closes the connection on it
    assert accepted is (clusterable.kind == "rabbitmq")
    assert (q2.disconnects > 0) is (clusterable.kind == "nats")

    # A '.' in a topic level (allowed in EdgeGuard's device ids and fleet names): RabbitMQ turns it into
    # '/' (its AMQP routing keys use '.' between levels), NATS refuses it and closes the connection.
    dot = _probe(probes, clusterable)
    dot.connected()
    dot.publish(f"edgeguard/v1/{fleet}/cam.01/heartbeat", b"h")
    if clusterable.kind == "rabbitmq":
        assert sub.wait(lambda: any(t.endswith("/cam/01/heartbeat") for t, *_ in sub.messages))
    else:
        assert dot.wait(lambda: dot.disconnects > 0)
        assert not any("cam" in t for t, *_ in sub.messages)

    # A persistent session (clean_session false) keeps QoS 1 messages published while its client is away
    cid = f"persist-{fleet}"
    away = Probe(clusterable, clean=False, client_id=cid)
    away.connected()
    away.subscribe(f"edgeguard/v1/{fleet}/+/results")
    away.close()
    pub = _probe(probes, clusterable)
    pub.connected()
    big = b"r" * (1024 * 1024 + 1)  # beyond 1 MiB passes too (no broker-side limit configured here)
    for payload in (b"r0", b"r1", big):
        assert pub.publish(f"edgeguard/v1/{fleet}/d1/results", payload)
    back = _probe(probes, clusterable, clean=False, client_id=cid)
    back.connected()
    assert back.connack is not None
    assert back.wait(lambda: len(back.messages) >= 3), back.messages
    assert [p for _t, p, _r, _q in back.messages] == [b"r0", b"r1", big]
    back.close()
    Probe(clusterable, clean=True, client_id=cid).close()  # drop the session
