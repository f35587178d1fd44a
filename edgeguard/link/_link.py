"""The MQTT session: birth/LWT status, heartbeat, results from the outbox, events, inbound topics.

One thread does everything: the link thread drives paho's network loop itself (``select`` on the socket,
then ``loop_read`` / ``loop_write`` / ``loop_misc``; no ``loop_start``, paho's reconnecting switched off),
connects with our jittered backoff and injectable clock, reads the outbox, publishes, maps PUBACKs to results
and removes them. paho's callbacks therefore run in the link thread too: no hand-off, no wake-up and no lock
contention per message, and the table of in-flight message ids needs no lock. Nothing ever waits on paho's
``wait_for_publish`` (which can hang on a dropped connection). Producers only ever touch the outbox; other
threads (``on_inbound``, ``publish_event``, ``stop``) only queue a request and wake the loop through a
socket pair.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeguard.errors import LinkError
from edgeguard.link._config import TOPIC_SEGMENT, Backoff, LinkConfig, LinkState
from edgeguard.link._discovery import discovery_messages
from edgeguard.link._inbound import InboundRouter
from edgeguard.link._netloop import SubWait, Waker, max_packet_bytes, network_pass, new_client
from edgeguard.link._reasons import connect_error_reason, no_connack_reason
from edgeguard.outbox import Outbox, OutboxItem

__all__ = ["MqttLink"]

log = logging.getLogger("edgeguard.link")

_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1: bad credentials / not authorised; 5: 0x86, 0x87
_PROTOCOL_CODES = {1, 132}  # 3.1.1: unacceptable protocol version; 5: 0x84
# The result envelope in one bytes formatting operation (%r of a float is its shortest round-trip repr).
_ENVELOPE = b'%s%d","seq":%d,"kind":"%s","priority":%s,"created":%r,"data":%s}'


class MqttLink:
    def __init__(
        self,
        *,
        config: LinkConfig,
        fleet: str,
        device_id: str,
        outbox: Outbox,
        health: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        for name, value in (("fleet", fleet), ("device_id", device_id)):
            if not TOPIC_SEGMENT.fullmatch(value):
                raise ValueError(f"{name} {value!r} must be 1..64 of [A-Za-z0-9_.-]")
        self.config = config
        self.fleet = fleet
        self.device_id = device_id
        self.prefix = f"edgeguard/v1/{fleet}/{device_id}/"
        self._outbox = outbox
        self._health = health or dict
        # Sees every event before it is queued (the audit log records the security-relevant ones): all of the
        # device's events pass here, so no publisher can forget to audit.
        self._on_event = on_event
        self._clock = clock
        self._wall = wall
        self._backoff = backoff or Backoff(config.backoff_initial_s, config.backoff_max_s)
        self._protocol = mqtt.MQTTv311 if config.protocol == "3.1.1" else mqtt.MQTTv5
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first_attempt = threading.Event()
        self._lock = threading.Lock()  # the small shared state below (events, inbound table, counters)
        self._events: deque[bytes] = deque()
        self._answers: deque[bytes] = deque()  # signed command answers for cmd/resp (lock; bounded)
        # More fields for the retained birth status (the key that signs command answers); set before start.
        self.birth_extra: dict[str, Any] = {}
        self._inbound = InboundRouter(self.prefix, config.inbound_max_bytes)
        # Link-thread-only state.
        self._connected = False
        self._connack: ReasonCode | None = None
        self._v5_closes = 0  # MQTT 5 CONNECTs in a row the broker closed without CONNACK (auto fallback)
        self._probing_311 = False  # on 3.1.1 because of such closes, not yet connected with it
        self._dropped = False
        # Other threads wake the loop's select() through this pair (inbound handler added, stop requested).
        self._waker = Waker()
        self._puback: list[tuple[int, bool]] = []  # (mid, refused), from paho's callback (this thread)
        self._subscribed: dict[int, SubWait] = {}  # SUBSCRIBE mid -> the on_inbound() call waiting for it
        self._sub_waiters: list[SubWait] = []  # on_inbound() calls not subscribed yet (lock)
        self._unsubscribe: list[str] = []  # filters to UNSUBSCRIBE from at the next step (lock)
        self._next_tick = 0.0
        self._ahead = 2 * config.inflight_window  # results handed to paho: on the wire + queued behind them
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._rejected_seqs: list[int] = []
        self._last_sent = -1
        self._read_upto = -1  # newest seq read into _ready
        self._ready: deque[OutboxItem] = deque()
        self._read_ahead = min(512, max(64, 4 * config.inflight_window))
        self._id_prefix = b'{"id":"' + outbox.device_id.encode() + b":"
        self._pause_until = 0.0
        self._next_attempt = 0.0
        self._next_heartbeat = 0.0
        self._paho_errors: list[str] = []
        self._paho_log = logging.Logger(f"edgeguard.link.paho.{device_id}", logging.ERROR)
        self._paho_log.addFilter(self._paho_error)
        self._started_at = clock()
        self._hb_seq = 0
        # Counters (read by state()).
        self._error: str | None = None
        self._error_kind: str | None = None
        self._connects = self._attempts = self._published = self._acked_n = 0
        self._rejected = self._events_dropped = 0

    # ------------------------------------------------------------------------------------------ public face
    @property
    def state(self) -> LinkState:
        return LinkState(
            connected=self._connected,
            error=self._error,
            error_kind=self._error_kind,
            protocol="5" if self._protocol == mqtt.MQTTv5 else "3.1.1",
            connects=self._connects,
            attempts=self._attempts,
            published=self._published,
            acked=self._acked_n,
            inflight=len(self._inflight),
            rejected=self._rejected,
            inbound_dropped=self._inbound.dropped,
            events_dropped=self._events_dropped,
        )

    @property
    def loop_alive(self) -> bool:
        """Whether the link thread (connecting, publishing and paho's network loop, all in one) is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LinkError | None:
        """Start the link thread; wait up to ``startup_wait_s`` for the first connection attempt. Returns the
        reason as a LinkError when that attempt failed (also logged as one line and kept in ``state``); the
        link keeps buffering and retrying either way."""
        if self._thread is not None:
            raise RuntimeError("link already started")
        self._client = self._make_client()  # bad TLS files fail here, before any thread exists
        self._thread = threading.Thread(target=self._run, name="edgeguard-mqtt", daemon=True)
        self._thread.start()
        self._first_attempt.wait(self.config.startup_wait_s)
        if self._error is not None and not self._connected:
            return LinkError(self._error)
        return None

    def stop(self) -> None:
        """Publish the offline status (waiting at most ``stop_timeout_s`` for its ack) and disconnect."""
        self._stop.set()
        self._waker.poke()
        if self._thread is not None:
            self._thread.join(self.config.stop_timeout_s + self.config.connect_timeout_s + 2.0)
        if self._thread is not None and not self._thread.is_alive():
            self._waker.close()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._connected and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._connected

    def publish_event(self, kind: str, data: dict[str, Any]) -> None:
        """Queue an event for the `events` topic (bounded; dropped ones are counted). Never blocks."""
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:  # the observer must not cost the event
                log.exception("event observer failed for %s", kind)
        # The envelope's own keys win: consumers (docs/schemas/events.json) rely on a numeric time and the
        # publishing device's id whatever an event's data carries.
        body = {**data, "kind": kind, "time": self._wall(), "device": self.device_id}
        payload = json.dumps(body, default=str).encode()
        with self._lock:
            if len(self._events) >= self.config.events_max_queued:
                self._events.popleft()
                self._events_dropped += 1
            self._events.append(payload)

    def publish_answer(self, payload: bytes) -> None:
        """Queue a signed command answer for ``cmd/resp`` (QoS 1; bounded like events, the oldest dropped and
        counted). Never blocks."""
        with self._lock:
            if len(self._answers) >= self.config.events_max_queued:
                self._answers.popleft()
                self._events_dropped += 1
            self._answers.append(payload)
        self._waker.poke()  # an operator is waiting for it: out now, not at the next 50 ms tick

    def on_inbound(
        self,
        topic_suffix: str,
        callback: Callable[[bytes], None],
        *,
        max_bytes: int | None = None,
        timeout: float | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> bool:
        """Deliver messages on exactly ``<prefix><topic_suffix>`` (no wildcards) to ``callback`` as raw bytes.
        Oversized messages and callback failures are logged, counted and dropped, and ``on_drop(reason)`` is
        told so the owner of the topic can report them.

        While connected the topic is subscribed at once and this waits (at most ``timeout``, by default
        ``connect_timeout_s``) for the broker's SUBACK, so a message published after it returns True is
        delivered. Returns False when not connected (or no SUBACK in time): every (re)connection subscribes
        to all registered topics anyway."""
        self._inbound.add(topic_suffix, callback, max_bytes, on_drop)
        # Ordering: _on_connected sets _connected before it reads the topics, so a handler added while it
        # connects is either in that read or seen here as connected (then subscribed twice: harmless).
        if not self._connected or threading.current_thread() is self._thread:
            return False  # the link thread itself (a handler) must not wait on its own loop
        wait = SubWait(self._inbound.prefix + topic_suffix)
        with self._lock:
            self._sub_waiters.append(wait)
        self._waker.poke()
        wait.done.wait(self.config.connect_timeout_s if timeout is None else timeout)
        return wait.ok

    def on_fleet_subtree(
        self,
        suffix: str,
        callback: Callable[[str, bytes], None],
        *,
        max_bytes: int,
        level: str = "+",
        timeout: float | None = None,
    ) -> bool:
        """Deliver the fleet-wide topics ``edgeguard/v1/<fleet>/<suffix>/<level>`` to ``callback(level,
        payload)`` (a bundle: ``suffix`` = ``bundles/<sha256>``, ``level`` = ``meta``, then ``+`` for its
        chunks), subscribed until :meth:`off_fleet_subtree`; every reconnection subscribes again, so retained
        messages come again after a network loss. Waits for the SUBACK like :meth:`on_inbound` while
        connected."""
        prefix = f"edgeguard/v1/{self.fleet}/{suffix}/"
        topic_filter = self._inbound.add_subtree(prefix, callback, max_bytes, level)
        if not self._connected or threading.current_thread() is self._thread:
            return False
        wait = SubWait(topic_filter)
        with self._lock:
            self._sub_waiters.append(wait)
        self._waker.poke()
        wait.done.wait(self.config.connect_timeout_s if timeout is None else timeout)
        return wait.ok

    def off_fleet_subtree(self, suffix: str, level: str | None = None) -> None:
        """Stop delivering (at once) and unsubscribe (at the link's next step) a subtree; with ``level``,
        only unsubscribe from that one filter of it (delivery goes on)."""
        filters = self._inbound.remove_subtree(f"edgeguard/v1/{self.fleet}/{suffix}/", level)
        if filters:
            with self._lock:
                self._unsubscribe.extend(filters)
            self._waker.poke()

    # --------------------------------------------------------------------------------------------- the client
    def _make_client(self) -> mqtt.Client:
        client = new_client(
            self.config,
            protocol=self._protocol,
            client_id=self.config.client_id or f"edgeguard-{self.fleet}-{self.device_id}",
            will_topic=self.prefix + "status",
            will_payload=json.dumps({"state": "offline", "device": self.device_id}).encode(),
            on_oversize=self._inbound.oversize,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _paho_error(self, record: logging.LogRecord) -> bool:
        if len(self._paho_errors) < 8:
            self._paho_errors.append(record.getMessage())
        return False  # recorded for the one-line reason; paho's own wording is not logged twice

    # paho calls these from loop_read()/loop_misc(), that is in the link thread.
    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        self._connack = rc

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        if self._connected:
            log.warning("link: disconnected from %s:%s (%s)", self.config.host, self.config.port, rc)
        self._connected = False
        self._dropped = True

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        # Collected and mapped to results after loop_read() returns, one outbox ack per network pass; paho
        # meanwhile sends the results it holds queued behind the window, so the pipe stays full.
        self._puback.append((mid, rc.is_failure))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        wait = self._subscribed.pop(mid, None)
        refused = [rc for rc in rcs if rc.is_failure]
        if refused:
            log.warning("link: broker refused a subscription (%s)", refused[0])
        if wait is not None:
            wait.ok = not refused
            wait.done.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # paho hands on a topic that is not UTF-8 (only a broker can send one) and raises when it is read;
            # raised here, that would end the link thread. It matches no route: dropped and counted.
            topic = "(topic not UTF-8)"
        self._inbound.deliver(topic, bytes(msg.payload))

    # ---------------------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._connected:
                    self._take_pubacks()
                    self._requeue_sub_waiters()
                    wait = self._next_attempt - self._clock()
                    if wait > 0:
                        self._waker.idle(min(wait, 0.25))
                        continue
                    self._connect_once()
                    self._first_attempt.set()
                    continue
                # Blocks until PUBACKs arrive (or 50 ms pass, for new results, events and the heartbeat).
                if not self._network(0.05):
                    self._connected = False
                self._step()
            self._goodbye()
        except Exception:  # a bug must not silently stop delivery: say so loudly, the supervisor restarts us
            log.exception("link thread failed")
            self._error, self._error_kind = "link thread failed (see log)", "internal"
            raise
        finally:
            self._first_attempt.set()

    def _network(self, timeout: float) -> bool:
        assert self._client is not None
        return network_pass(self._client, self._waker, timeout)

    def _take_pubacks(self) -> None:
        # mids are registered by this thread right after publish() returns, and PUBACKs are looked up here,
        # in the same thread, afterwards: a PUBACK can never miss its mid.
        if not self._puback:
            return
        acked: list[int] = []
        pubacks, self._puback = self._puback, []
        for mid, failed in pubacks:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue
            if failed:  # MQTT 5 PUBACK with an error code: the broker did not take it; keep it queued
                self._rejected += 1
                self._rejected_seqs.append(seq)
            else:
                acked.append(seq)
        if acked:
            self._acked_n += len(acked)
            self._outbox.ack(acked)

    def _step(self) -> None:
        client = self._client
        assert client is not None
        self._take_pubacks()
        if not self._connected:
            self._schedule_retry(f"connection to {self.config.host}:{self.config.port} lost", "lost")
            return
        if self._sub_waiters:  # a handler registered while connected: subscribe now, report the SUBACK
            with self._lock:
                waiters, self._sub_waiters = self._sub_waiters, []
            current = set(self._inbound.topics())
            for wait in waiters:
                if wait.topic not in current:  # removed before it was subscribed (a bundle chunk on disk)
                    wait.done.set()
                    continue
                rc, mid = client.subscribe(wait.topic, qos=1)
                if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._subscribed[mid] = wait
        if self._unsubscribe:
            with self._lock:
                gone, self._unsubscribe = self._unsubscribe, []
            for topic_filter in gone:
                client.unsubscribe(topic_filter)
        self._pump(client)
        if self._answers:
            self._flush_answers(client)
        now = self._clock()
        if now >= self._next_tick:  # events and heartbeat need no per-PUBACK attention
            self._next_tick = now + 0.05
            self._flush_events(client)
            if now >= self._next_heartbeat:
                self._heartbeat(client)

    def _requeue_sub_waiters(self) -> None:
        # Connection lost before the SUBACK: the next connection subscribes to every topic and answers them.
        if self._subscribed:
            with self._lock:
                self._sub_waiters.extend(self._subscribed.values())
            self._subscribed.clear()

    def _pump(self, client: mqtt.Client) -> None:
        if self._rejected_seqs and not self._inflight:
            # Resend from the first refused result after a pause, keeping order for what is still queued.
            self._last_sent = min(self._rejected_seqs) - 1
            self._read_upto = self._last_sent
            self._ready.clear()
            self._rejected_seqs = []
            self._pause_until = self._clock() + self._backoff.next_delay()
            self._error, self._error_kind = "broker refused a result (PUBACK error); retrying", "publish"
            self._next_heartbeat = min(self._next_heartbeat, self._clock())
            return
        room = self._ahead - len(self._inflight)
        if room <= 0 or self._rejected_seqs or self._clock() < self._pause_until:
            return
        if not self._ready and self._outbox.last_seq > self._read_upto:
            # Read ahead of the window: one query and one decrypt pass per several acks, not per ack.
            ahead = self._outbox.peek(after=self._read_upto, limit=self._read_ahead)
            if ahead:
                self._ready.extend(ahead)
                self._read_upto = ahead[-1].seq
        topic = self.prefix + "results"
        while room > 0 and self._ready:
            item = self._ready.popleft()
            room -= 1
            # The id and kind come from checked charsets (no quoting needed); the result is JSON by contract.
            envelope = _ENVELOPE % (
                self._id_prefix,
                item.seq,
                item.seq,
                item.kind.encode(),
                b"true" if item.priority else b"false",
                item.created,
                item.payload,
            )
            info = client.publish(topic, envelope, qos=1)
            self._inflight[info.mid] = item.seq
            self._last_sent = item.seq
            self._published += 1

    def _flush_events(self, client: mqtt.Client) -> None:
        for event in self._outbox.drain_events():
            self.publish_event(str(event.pop("event")), event)
        with self._lock:
            batch = list(self._events)
            self._events.clear()
        for payload in batch:
            client.publish(self.prefix + "events", payload, qos=1)
        self._flush_answers(client)

    def _flush_answers(self, client: mqtt.Client) -> None:
        with self._lock:
            answers = list(self._answers)
            self._answers.clear()
        for payload in answers:
            client.publish(self.prefix + "cmd/resp", payload, qos=1)

    def _heartbeat(self, client: mqtt.Client) -> None:
        self._next_heartbeat = self._clock() + self.config.heartbeat_s
        self._hb_seq += 1
        try:
            health = dict(self._health())
        except Exception as exc:  # a failing health source must not stop heartbeats
            health = {"health_error": f"{type(exc).__name__}: {exc}"}
        body = {
            **health,
            "device": self.device_id,
            "time": self._wall(),
            "uptime_s": round(self._clock() - self._started_at, 3),
            "sequence": self._hb_seq,
            "outbox": self._outbox.stats().to_json(),
            "link": self.state.to_json(),
        }
        client.publish(self.prefix + "heartbeat", json.dumps(body, default=str).encode(), qos=0)

    # ------------------------------------------------------------------------------------------- connecting
    def _connect_once(self) -> None:
        cfg = self.config
        client = self._client
        assert client is not None
        self._attempts += 1
        self._connack = None
        self._paho_errors = []
        v5 = self._protocol == mqtt.MQTTv5
        props: Properties | None = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s
            # MQTT 5.0 3.1.2.11.4: the broker must not send us a larger packet (mosquitto drops the message
            # for us and keeps the connection), so an oversize publish never reaches the device at all.
            props.MaximumPacketSize = max_packet_bytes(cfg)
        self._dropped = False
        # paho's errors while connecting (TLS, socket) make the one-line reason; recorded through a private
        # logger set to ERROR. Only while connecting: once connected, paho would call the logger twice per
        # result (a measurable share of the drain rate) for nothing we use.
        client.enable_logger(self._paho_log)
        try:
            client.connect(
                cfg.host,
                cfg.port,
                keepalive=cfg.keepalive_s,
                clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except Exception as exc:
            self._schedule_retry(*connect_error_reason(exc, self.config))
            return
        deadline = self._clock() + cfg.connect_timeout_s
        while self._read_connack() is None and not self._dropped and not self._stop.is_set():
            left = deadline - self._clock()
            if left <= 0 or not self._network(min(left, 0.05)):
                break
        rc = self._read_connack()
        if rc is None or rc.is_failure:
            client.disconnect()  # sends DISCONNECT (if the socket is still open) and closes it
        if rc is not None and not rc.is_failure:
            self._on_connected(client)
            return
        if rc is None:
            reason, kind = no_connack_reason(self._paho_errors, tls=self.config.ca_file is not None)
            if not self._closed_on_connect(refused_cert=reason.startswith("TLS: broker refused our client")):
                self._schedule_retry(reason, kind)
            return
        if rc.value in _PROTOCOL_CODES and cfg.protocol == "auto" and v5 and not self._inflight:
            log.warning("link: broker refused MQTT 5 (%s); falling back to 3.1.1", rc)
            self._protocol = mqtt.MQTTv311
            self._client = self._make_client()
            self._next_attempt = 0.0
            return
        if rc.value in _AUTH_CODES:
            self._schedule_retry(f"broker refused credentials ({rc})", "auth")
        else:
            self._schedule_retry(f"broker refused the connection ({rc})", "refused")

    def _closed_on_connect(self, *, refused_cert: bool) -> bool:
        """The broker closed the connection on our CONNECT without a CONNACK. RabbitMQ's MQTT plugin before
        3.13 cannot parse an MQTT 5 CONNECT and does exactly that (no "unacceptable protocol version"
        answer), so with ``protocol = "auto"`` two such closes in a row switch to 3.1.1 for the next
        attempt; should 3.1.1 be closed the same way, the broker is unwell rather than MQTT 5-deaf, and the
        link goes back to 5. True when the next attempt is scheduled here (at once)."""
        if self.config.protocol != "auto" or not self._dropped or refused_cert or self._inflight:
            self._v5_closes = 0
            return False
        if self._protocol == mqtt.MQTTv5:
            self._v5_closes += 1
            if self._v5_closes < 2:
                return False
            log.warning(
                "link: %s:%s closed the connection twice on an MQTT 5 CONNECT without answering (as RabbitMQ "
                "before 3.13 does); trying MQTT 3.1.1",
                self.config.host,
                self.config.port,
            )
            self._v5_closes = 0
            self._probing_311 = True
            self._protocol = mqtt.MQTTv311
            self._client = self._make_client()
            self._next_attempt = 0.0
            return True
        if self._probing_311:
            self._probing_311 = False
            self._protocol = mqtt.MQTTv5
            self._client = self._make_client()
        return False

    def _read_connack(self) -> ReasonCode | None:
        return self._connack  # set by paho's callback inside loop(); a call stops mypy pinning it to None

    def _schedule_retry(self, reason: str | None, kind: str | None) -> None:
        if reason is not None:
            text = f"link: {reason}"
            if text != self._error:
                log.error("%s; buffering results and retrying", text)
            self._error, self._error_kind = text, kind
        self._connected = False
        self._next_attempt = self._clock() + self._backoff.next_delay()

    def _on_connected(self, client: mqtt.Client) -> None:
        client.disable_logger()
        self._v5_closes, self._probing_311 = 0, False  # a 3.1.1 found this way stays (as after a refusal)
        self._connected = True
        self._connects += 1
        self._backoff.reset()
        self._error = self._error_kind = None
        log.info("link: connected to %s:%s", self.config.host, self.config.port)
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Small packets that someone waits for (PUBACKs, command answers): without this, Nagle's
            # algorithm meeting the peer's delayed ACK holds each for ~40 ms.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        birth = {
            **self.birth_extra,
            "state": "online",
            "device": self.device_id,
            "fleet": self.fleet,
            "time": self._wall(),
        }
        client.publish(self.prefix + "status", json.dumps(birth).encode(), qos=1, retain=True)
        with self._lock:  # every registered topic is subscribed below: no separate SUBSCRIBE for these
            waiters, self._sub_waiters = self._sub_waiters, []
        for topic in self._inbound.topics():
            rc, mid = client.subscribe(topic, qos=1)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                for wait in waiters:
                    if wait.topic == topic:
                        self._subscribed[mid] = wait
        if self.config.ha_discovery:
            for topic, payload in discovery_messages(
                self.config.ha_prefix, self.fleet, self.device_id, self.prefix
            ):
                client.publish(topic, payload, qos=1, retain=True)
        self._next_heartbeat = self._clock()  # announce figures right away

    def _goodbye(self) -> None:
        client = self._client
        if client is None or not self._connected:
            return
        # What was queued last (a command's answer before a requested restart, the last events) goes out
        # before the offline status, whose PUBACK then also means they were sent (QoS 1 keeps the order).
        self._flush_events(client)
        offline = json.dumps({"state": "offline", "device": self.device_id, "time": self._wall()}).encode()
        info = client.publish(self.prefix + "status", offline, qos=1, retain=True)
        deadline = self._clock() + self.config.stop_timeout_s
        while not info.is_published() and self._connected and self._clock() < deadline:
            if not self._network(min(0.05, max(0.0, deadline - self._clock()))):
                break
            self._take_pubacks()
        self._take_pubacks()
        self._connected = False
        client.disconnect()  # unacknowledged results stay in the outbox and are sent again next time
