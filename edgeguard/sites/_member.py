"""This device as a member of its site group: the shared group input and the streams bound to one device.

One MQTT 5 connection of its own (not the link's), because the share needs a session the link must not have:
**clean start and session expiry 0**. Measured on mosquitto 2.0.11 (docs/sites.md, "What the broker does with
a dead member"): the broker hands shared-subscription messages round-robin to the members and queues them in
the chosen member's session even past its Receive Maximum; when that member dies, neither its in-flight nor
its queued messages go to another member. With a persistent session they wait for it to come back (maybe
never: stranded); with expiry 0 they are discarded at once and the sender's retry (same correlation id,
``attempt`` + 1, see :mod:`edgeguard.sites.client`) brings them to a live member. The link's results session
stays persistent, so the results of what was served survive.

Flow: paho's thread receives (``manual_ack``: no PUBACK yet) and queues; a worker runs the input through the
pipeline, which stores the result durably in the outbox; only then is the PUBACK sent. An input the device
cannot serve right now (the model went away) goes back to the head of the queue unacknowledged.
A ticker re-checks every ``check_s`` whether the device can serve (model, degraded, queue depth, thermal)
and leaves the share (UNSUBSCRIBE) or joins it again; it also runs the stream leases (:mod:`._lease`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeguard._echo import cut
from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import EdgeGuardError, InputRejected, ServiceUnavailable
from edgeguard.link._config import LinkConfig
from edgeguard.link._netloop import tls_context
from edgeguard.sources import BodyLimits, InferenceSink, parse_body

from ._config import SiteConfig, group_topic, share_topic
from ._lease import StreamLease, parse_lease_unverified, parse_member_status

__all__ = ["GroupMember", "NOT_MQTT5"]

_log = logging.getLogger("edgeguard.sites")

NOT_MQTT5 = (
    "site: the broker does not offer MQTT 5 shared subscriptions (it speaks MQTT 3.1.1 only, or refuses "
    "$share); group input cannot be balanced by it: use an MQTT 5 broker (mosquitto >= 1.6, EMQX, HiveMQ, "
    "VerneMQ) or give each device its own input topic (docs/sites.md)"
)
_UNSUPPORTED_PROTOCOL = (0x84, 1)  # MQTT 5 reason code; MQTT 3.1.1 return code
_SHARED_NOT_SUPPORTED = 0x9E
_MAX_CID = 128

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class _Item:
    mid: int
    generation: int  # the connection it came on: a PUBACK for another connection's mid must not be sent
    payload: bytes
    correlation_id: str | None
    attempt: int
    dup: bool
    stream: str | None = None
    token: int = 0


def _correlation_unverified(props: Any) -> tuple[str | None, int]:
    """Correlation id (MQTT 5 Correlation Data) and attempt (user property) of an inbound input."""
    cid: str | None = None
    raw = getattr(props, "CorrelationData", None)
    if isinstance(raw, bytes | bytearray) and 0 < len(raw) <= _MAX_CID:
        text = bytes(raw).decode("utf-8", "replace")
        cid = text if text.isprintable() else None
    attempt = 1
    for key, value in getattr(props, "UserProperty", None) or []:
        if key == "attempt" and value.isdigit() and len(value) <= 6:
            attempt = max(1, int(value))
    return cid, attempt


class GroupMember:
    name = "group"

    def __init__(
        self,
        *,
        config: SiteConfig,
        link: LinkConfig,
        fleet: str,
        device_id: str,
        sink: InferenceSink,
        specs: Callable[[], Sequence[TensorSpec]],
        limits: BodyLimits,
        unable: Callable[[], str],  # why the device cannot serve now ("" when it can)
        on_event: EventSink | None = None,
        temperature: Callable[[], float | None] = lambda: None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._link = link
        self.fleet, self.me = fleet, device_id
        self._sink, self._specs, self._limits = sink, specs, limits
        self._unable, self._on_event, self._temperature, self._wall = unable, on_event, temperature, wall
        self.share = share_topic(fleet, config.group)
        self._member_topic = group_topic(fleet, config.group, f"member/{device_id}")
        self._probe_topic = group_topic(fleet, config.group, f"probe/{device_id}")
        self._lock = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._busy = 0
        self._leases = {
            s.name: StreamLease(s, device_id) for s in config.streams if device_id in s.candidates
        }
        self._stream_subscribed: set[str] = set()
        self._in_stream: dict[str, int] = dict.fromkeys(self._leases, 0)
        self._generation = 0
        self._connected = False
        self._joined = False  # SUBSCRIBE to the share sent on this connection (and not left)
        self._left_reason = "not connected"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.error: str | None = None
        self.dead = False  # refused the broker for good (no MQTT 5 shared subscriptions)
        self.counts = {
            "received": 0, "served": 0, "redelivered": 0, "rejected": 0, "failed": 0, "requeued": 0,
            "overrun": 0, "joins": 0, "leaves": 0, "connects": 0,
        }
        self._client = self._make_client()

    # ------------------------------------------------------------------------------------ lifecycle
    def _make_client(self) -> mqtt.Client:
        cfg = self._link
        base = cfg.client_id or f"edgeguard-{self.fleet}-{self.me}"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{base}-site"[:128],
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.reconnect_delay_set(max(1, int(cfg.backoff_initial_s)), max(1, int(cfg.backoff_max_s)))
        client.connect_timeout = cfg.connect_timeout_s
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.ca_file is not None:
            site = self.config
            if site.client_cert is not None:  # its own identity: the broker may make the CN the client id
                cfg = dataclasses.replace(cfg, client_cert=site.client_cert, client_key=site.client_key)
            client.tls_set_context(tls_context(cfg))
        client.will_set(self._member_topic, self._status(online=False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0  # nothing may wait in a dead session (module docstring)
        props.ReceiveMaximum = self.config.receive_maximum
        self._client.connect_async(
            self._link.host, self._link.port, keepalive=self.config.keepalive_s, clean_start=True,
            properties=props,
        )
        self._client.loop_start()
        for i in range(self.config.workers):
            self._spawn(self._work, f"eg-group-{i}")
        self._spawn(self._tick, "eg-group-check")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the share, finish what was taken (each input is answered before its PUBACK), disconnect."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            leave = self._joined and self._connected
            self._joined = False
        if leave:  # outside our lock (see check())
            self._client.unsubscribe(self.share)
        with self._lock:
            end = time.monotonic() + timeout
            while (self._queue or self._busy) and time.monotonic() < end and not self.dead:
                self._lock.wait(0.1)
            self._lock.notify_all()
        self._client.publish(self._member_topic, self._status(online=False), qos=1, retain=True)
        self._client.disconnect()
        self._client.loop_stop()
        for t in self._threads:
            t.join(2.0)

    # ------------------------------------------------------------------------------------ paho callbacks
    def _status(self, *, online: bool) -> bytes:
        doc: dict[str, Any] = {"state": "online" if online else "offline", "device": self.me,
                               "group": self.config.group}
        if online:
            doc.update({"share": "joined" if self._joined else "left", "reason": self._left_reason or None})
        return json.dumps(doc).encode()

    def _refuse(self, client: mqtt.Client, why: str) -> None:
        self.error, self.dead = why, True
        _log.error("%s", why)
        self._event("site-refused", {"reason": why})
        self._stop.set()
        client.disconnect()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            if int(rc.value) in _UNSUPPORTED_PROTOCOL:
                self._refuse(client, NOT_MQTT5)
            else:
                self.error = f"site: connection refused: {rc}"
            return
        if getattr(props, "SharedSubscriptionAvailable", 1) == 0:
            self._refuse(client, NOT_MQTT5)
            return
        with self._lock:
            self._generation += 1
            self._connected, self._joined, self.error = True, False, None
            self._stream_subscribed.clear()
            self.counts["connects"] += 1
            for lease in self._leases.values():
                lease.on_connect()
        client.publish(self._member_topic, self._status(online=True), qos=1, retain=True)
        if self._leases:
            client.subscribe(
                [(group_topic(self.fleet, self.config.group, t), 1) for t in ("member/+", "lease/+")]
                + [(self._probe_topic, 1)]
            )
            # Retained messages come right after the SUBACK, before anything published later: when this
            # probe comes back, every retained lease and member status has been seen.
            client.publish(self._probe_topic, b"probe", qos=1)
        self._wake.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._lock:
            self._connected, self._joined = False, False
            self._left_reason = "not connected"
            self._stream_subscribed.clear()
            for lease in self._leases.values():
                lease.on_disconnect()
        if not self._stop.is_set():
            _log.warning("site connection lost: %s", rc)

    def _on_subscribe(self, client: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if any(int(c.value) == _SHARED_NOT_SUPPORTED for c in codes):
            self._refuse(client, NOT_MQTT5)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: cheap, never raises, never runs inference."""
        try:
            self._route(client, msg)
        except Exception:  # a bad message must not kill paho's loop
            _log.exception("group message on %s dropped", cut(msg.topic))

    def _route(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        base = group_topic(self.fleet, self.config.group, "")
        if topic == base + "input" or (topic.startswith(base + "stream/") and topic.endswith("/input")):
            self._take(client, msg, None if topic == base + "input" else topic[len(base) + 7 : -6])
            return
        client.ack(msg.mid, msg.qos)  # control topics: nothing to keep
        with self._lock:
            if topic == self._probe_topic:
                for lease in self._leases.values():
                    lease.on_loaded()
            elif topic.startswith(base + "member/"):
                online = parse_member_status(bytes(msg.payload))
                for lease in self._leases.values():
                    lease.on_status(topic[len(base) + 7 :], online)
            elif topic.startswith(base + "lease/"):
                held = self._leases.get(topic[len(base) + 6 :])
                body = bytes(msg.payload)
                parsed = None if held is None else parse_lease_unverified(body, held.binding.name)
                if held is not None and parsed is not None:
                    again = held.on_lease(parsed)
                    if again is not None:
                        held.pending = again
                        self._publish_lease(held.binding.name, again)
        self._wake.set()

    def _take(self, client: mqtt.Client, msg: mqtt.MQTTMessage, stream: str | None) -> None:
        cid, attempt = _correlation_unverified(getattr(msg, "properties", None))
        token = 0
        with self._lock:
            self.counts["received"] += 1
            if stream is not None:
                lease = self._leases.get(stream)
                if lease is None or not lease.serving:
                    client.ack(msg.mid, msg.qos)  # not ours (any more): the holder serves the stream
                    return
                token = lease.token
                self._in_stream[stream] += 1
            if len(self._queue) + self._busy >= self.config.queue_size:
                # The share was left at leave_at, but mosquitto 2.0.11 overruns Receive Maximum and still
                # delivers what it had queued for this session. Kept and served, never dropped and never left
                # unacknowledged (it would block this session's window until a reconnect): counted instead.
                self.counts["overrun"] += 1
            self._queue.append(
                _Item(msg.mid, self._generation, bytes(msg.payload), cid, attempt, bool(msg.dup), stream,
                      token)
            )
            self._lock.notify()
            if len(self._queue) >= self.config.leave_at:
                self._wake.set()

    # ------------------------------------------------------------------------------------ serving
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not (self._stop.is_set() and not self._busy):
                    self._lock.wait(0.5)
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy += 1
            answered = False
            try:
                answered = self._serve(item)
            finally:
                with self._lock:
                    self._busy -= 1
                    if not answered:
                        self._queue.appendleft(item)  # not answered, not acked: retried when it can serve
                        self.counts["requeued"] += 1
                    elif item.stream is not None:
                        self._in_stream[item.stream] -= 1
                    self._lock.notify_all()
            if answered:
                with self._lock:
                    same = item.generation == self._generation and self._connected
                if same:
                    self._client.ack(item.mid, 1)
            else:
                self._wake.set()
                self._stop.wait(self.config.check_s)

    def _serve(self, item: _Item) -> bool:
        """Run one input to a durable result (or a reported rejection). False: not served, keep it."""
        redelivered = item.dup or item.attempt > 1
        notes: dict[str, Any] = {"served_by": self.me, "group": self.config.group, "attempt": item.attempt,
                                 "redelivered": redelivered}
        if item.stream is not None:
            notes.update({"stream": item.stream, "fencing_token": item.token})
        try:
            request = parse_body(body=item.payload, content_type="", specs=self._specs(), source="group",
                                 limits=self._limits)
            cid = item.correlation_id or request.correlation_id
            self._sink(dataclasses.replace(request, correlation_id=cid, annotations=notes))
        except ServiceUnavailable:
            return False
        except InputRejected as exc:
            self._count("rejected")
            self._event("input-rejected", {"source": "group", "reason": cut(str(exc)),
                                           "correlation_id": item.correlation_id, **notes})
            return True
        except EdgeGuardError as exc:
            self._count("failed")
            self._event("input-failed", {"source": "group", "reason": cut(str(exc)),
                                         "correlation_id": item.correlation_id, **notes})
            return True
        except Exception as exc:
            self._count("failed")
            _log.exception("group input failed")
            self._event("input-failed", {"source": "group", "reason": cut(repr(exc)),
                                         "correlation_id": item.correlation_id, **notes})
            return True
        self._count("served")
        if redelivered:
            self._count("redelivered")
        return True

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:
                _log.exception("event sink failed")

    # ------------------------------------------------------------------------------------ share and leases
    def why_not(self) -> str:
        """Why this device must not take group input now ("" when it may)."""
        reason = self._unable()
        if reason:
            return reason
        temp = self._temperature()
        if self.config.max_temp_c is not None and temp is not None and temp > self.config.max_temp_c:
            return f"thermal: {temp:.1f} C above {self.config.max_temp_c:.1f} C"
        depth = len(self._queue) + self._busy
        limit = self.config.rejoin_at if not self._joined else self.config.leave_at - 1
        if depth > limit:
            return f"queue full ({depth} of {self.config.queue_size} taken)"
        return ""

    def _tick(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:
                _log.exception("group check failed")
            self._wake.wait(self.config.check_s)
            self._wake.clear()

    def check(self) -> None:
        """Join or leave the share, subscribe to the streams this device holds, publish lease changes.

        Decided under our lock, sent after releasing it: paho's network thread holds its callback lock while
        it calls ``_on_message`` (which takes ours), and paho's subscribe/publish take that callback lock,
        so calling them under our lock from this thread would deadlock."""
        ops: list[Callable[[], Any]] = []
        client = self._client
        with self._lock:
            if not self._connected or self._stop.is_set():
                return
            reason = self.why_not()
            changed = False
            if reason and self._joined:
                ops.append(lambda: client.unsubscribe(self.share))
                self._joined, changed = False, True
                self.counts["leaves"] += 1
            elif not reason and not self._joined:
                ops.append(lambda: client.subscribe(self.share, qos=1))
                self._joined, changed = True, True
                self.counts["joins"] += 1
            if reason != self._left_reason:
                self._left_reason, changed = reason, True
            if changed:
                status = self._status(online=True)
                ops.append(lambda: client.publish(self._member_topic, status, qos=1, retain=True))
                event = {"group": self.config.group, "joined": self._joined, "reason": reason or None}
                ops.append(lambda: self._event("group-share", event))
            for name, lease in self._leases.items():
                self._stream_step(name, lease, ops)
        for op in ops:
            op()

    def _stream_step(self, name: str, lease: StreamLease, ops: list[Callable[[], Any]]) -> None:
        client = self._client
        topic = group_topic(self.fleet, self.config.group, f"stream/{name}/input")
        if lease.serving and name not in self._stream_subscribed:
            ops.append(lambda: client.subscribe(topic, qos=1))
            self._stream_subscribed.add(name)
            event = {"stream": name, "fencing_token": lease.token}
            ops.append(lambda: self._event("stream-serving", event))
        elif not lease.serving and name in self._stream_subscribed:
            ops.append(lambda: client.unsubscribe(topic))
            self._stream_subscribed.discard(name)
        if lease.lease is not None and lease.lease.holder == self.me and lease.accepted_here:
            b = lease.binding
            if b.handback and self.me != b.primary and lease.online.get(b.primary) is True:
                # Hand back only after leaving the stream and answering everything taken from it.
                if name in self._stream_subscribed:
                    ops.append(lambda: client.unsubscribe(topic))
                    self._stream_subscribed.discard(name)
                if self._in_stream[name]:
                    return
        decided = lease.decide()
        if decided is not None:
            ops.append(lambda: self._publish_lease(name, decided))

    def _publish_lease(self, name: str, lease: Any) -> None:
        topic = group_topic(self.fleet, self.config.group, f"lease/{name}")
        self._client.publish(topic, lease.payload(name, self._wall()), qos=1, retain=True)
        self._event("stream-lease", {"stream": name, "holder": lease.holder, "fencing_token": lease.token})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "group": self.config.group,
                "connected": self._connected,
                "share": "joined" if self._joined else "left",
                "reason": self._left_reason or None,
                "queued": len(self._queue) + self._busy,
                "error": self.error,
                **self.counts,
                "streams": {n: lease.snapshot() for n, lease in self._leases.items()},
            }
