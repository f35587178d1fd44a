"""The MQTT session: birth/LWT status, heartbeat, results from the outbox, events, inbound topics.

Two threads: paho's network thread (``loop_start()``, with paho's own reconnecting switched off) reads and
writes the socket and only hands facts over (CONNACK, PUBACK mids, disconnects); the link thread connects
with our jittered backoff and injectable clock, reads the outbox, publishes, maps PUBACKs to results and
removes them. The table of in-flight message ids belongs to the link thread alone, and nothing ever waits on
paho's ``wait_for_publish`` (which can hang on a dropped connection). Producers only ever touch the outbox.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeguard.errors import LinkError
from edgeguard.link._config import TOPIC_SEGMENT, Backoff, LinkConfig, LinkState
from edgeguard.link._discovery import discovery_messages
from edgeguard.link._inbound import InboundRouter
from edgeguard.link._reasons import connect_error_reason, no_connack_reason
from edgeguard.outbox import Outbox, OutboxItem

__all__ = ["MqttLink"]

log = logging.getLogger("edgeguard.link")

_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1: bad credentials / not authorised; 5: 0x86, 0x87
_PROTOCOL_CODES = {1, 132}  # 3.1.1: unacceptable protocol version; 5: 0x84


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
    ) -> None:
        for name, value in (("fleet", fleet), ("device_id", device_id)):
            if not TOPIC_SEGMENT.match(value):
                raise ValueError(f"{name} {value!r} must be 1..64 of [A-Za-z0-9_.-]")
        self.config = config
        self.fleet = fleet
        self.device_id = device_id
        self.prefix = f"edgeguard/v1/{fleet}/{device_id}/"
        self._outbox = outbox
        self._health = health or dict
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
        self._inbound = InboundRouter(self.prefix, config.inbound_max_bytes)
        # Link-thread-only state.
        self._connected = False
        self._connack: ReasonCode | None = None
        self._dropped = False
        self._network_running = False
        self._wake = threading.Event()
        self._puback: deque[tuple[int, bool]] = deque()  # (mid, refused) from paho's thread
        self._wake_every = max(1, config.inflight_window // 2)
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
        if self._thread is not None:
            self._thread.join(self.config.stop_timeout_s + self.config.connect_timeout_s + 2.0)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._connected and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._connected

    def publish_event(self, kind: str, data: dict[str, Any]) -> None:
        """Queue an event for the `events` topic (bounded; dropped ones are counted). Never blocks."""
        body = {"kind": kind, "time": self._wall(), "device": self.device_id, **data}
        payload = json.dumps(body, default=str).encode()
        with self._lock:
            if len(self._events) >= self.config.events_max_queued:
                self._events.popleft()
                self._events_dropped += 1
            self._events.append(payload)

    def on_inbound(
        self, topic_suffix: str, callback: Callable[[bytes], None], *, max_bytes: int | None = None
    ) -> None:
        """Deliver messages on exactly ``<prefix><topic_suffix>`` (no wildcards) to ``callback`` as raw bytes.
        Oversized messages and callback failures are logged, counted and dropped."""
        self._inbound.add(topic_suffix, callback, max_bytes)

    # --------------------------------------------------------------------------------------------- the client
    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = self._protocol == mqtt.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"edgeguard-{self.fleet}-{self.device_id}",
            protocol=self._protocol,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,  # reconnecting is ours: jittered backoff, injectable clock, reasons
        )
        # paho puts at most inflight_window messages on the wire; we hand it up to twice that, so that each
        # PUBACK releases the next publish inside paho's own read loop and the pipe never runs dry while we
        # refill.
        client.max_inflight_messages_set(cfg.inflight_window)
        client.max_queued_messages_set(0)
        client.connect_timeout = cfg.connect_timeout_s
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.ca_file is not None:
            try:
                client.tls_set(
                    ca_certs=str(cfg.ca_file),
                    certfile=None if cfg.client_cert is None else str(cfg.client_cert),
                    keyfile=None if cfg.client_key is None else str(cfg.client_key),
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError) as exc:
                raise LinkError(
                    f"link: TLS files unusable ({cfg.ca_file}, {cfg.client_cert}): {exc}"
                ) from None
        offline = json.dumps({"state": "offline", "device": self.device_id}).encode()
        client.will_set(self.prefix + "status", offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # Errors only, through a private logger: an on_log callback would make paho format a debug line for
        # every packet (a measurable share of the drain rate).
        client.enable_logger(self._paho_log)
        return client

    def _paho_error(self, record: logging.LogRecord) -> bool:
        if len(self._paho_errors) < 8:
            self._paho_errors.append(record.getMessage())
        return False  # recorded for the one-line reason; paho's own wording is not logged twice

    # paho's network thread runs these: they only hand facts over to the link thread and wake it.
    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        self._connack = rc
        self._wake.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: ReasonCode, _p: Any) -> None:
        if self._connected:
            log.warning("link: disconnected from %s:%s (%s)", self.config.host, self.config.port, rc)
        self._connected = False
        self._dropped = True
        self._wake.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        # Runs with paho's message lock held: take no lock of ours (the link thread may be in publish()).
        self._puback.append((mid, rc.is_failure))
        # Wake the link thread once per half window, not per PUBACK: paho still holds the other half queued,
        # so the pipe stays full, and the link does one refill per batch (the 50 ms tick takes the rest).
        if len(self._puback) >= self._wake_every or rc.is_failure:
            self._wake.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbound.deliver(msg.topic, bytes(msg.payload))

    # ---------------------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._connected:
                    self._stop_network()
                    self._take_pubacks()
                    wait = self._next_attempt - self._clock()
                    if wait > 0:
                        self._stop.wait(min(wait, 0.25))
                        continue
                    self._connect_once()
                    self._first_attempt.set()
                    continue
                self._wake.wait(0.05)
                self._wake.clear()
                self._step()
            self._goodbye()
        except Exception:  # a bug must not silently stop delivery: say so loudly, the supervisor restarts us
            log.exception("link thread failed")
            self._error, self._error_kind = "link thread failed (see log)", "internal"
            raise
        finally:
            self._first_attempt.set()

    def _stop_network(self) -> None:
        # paho's thread ends by itself when the connection drops (reconnect_on_failure=False); join it.
        if self._network_running and self._client is not None:
            self._client.loop_stop()
            self._network_running = False

    def _take_pubacks(self) -> None:
        # mids are registered by this thread right after publish() returns, and PUBACKs are looked up here,
        # in the same thread, afterwards: a PUBACK can never miss its mid.
        acked: list[int] = []
        while self._puback:
            mid, failed = self._puback.popleft()
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
        for topic in self._inbound.topics(only_if_changed=True):  # a handler registered while connected
            client.subscribe(topic, qos=1)
        self._pump(client)
        self._flush_events(client)
        if self._clock() >= self._next_heartbeat:
            self._heartbeat(client)

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
            seq = str(item.seq).encode()
            envelope = b"".join(
                (
                    self._id_prefix,
                    seq,
                    b'","seq":',
                    seq,
                    b',"kind":"',
                    item.kind.encode(),
                    b'","priority":',
                    b"true" if item.priority else b"false",
                    b',"created":',
                    repr(item.created).encode(),
                    b',"data":',
                    item.payload,
                    b"}",
                )
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
        self._dropped = False
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
        client.loop_start()
        self._network_running = True
        deadline = self._clock() + cfg.connect_timeout_s
        while self._read_connack() is None and not self._dropped and not self._stop.is_set():
            left = deadline - self._clock()
            if left <= 0:
                break
            self._wake.wait(min(left, 0.05))
            self._wake.clear()
        rc = self._read_connack()
        if rc is None or rc.is_failure:
            client.disconnect()
            self._stop_network()
        if rc is not None and not rc.is_failure:
            self._on_connected(client)
            return
        if rc is None:
            self._schedule_retry(*no_connack_reason(self._paho_errors, tls=self.config.ca_file is not None))
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
        self._connected = True
        self._connects += 1
        self._backoff.reset()
        self._error = self._error_kind = None
        log.info("link: connected to %s:%s", self.config.host, self.config.port)
        birth = {"state": "online", "device": self.device_id, "fleet": self.fleet, "time": self._wall()}
        client.publish(self.prefix + "status", json.dumps(birth).encode(), qos=1, retain=True)
        for topic in self._inbound.topics():
            client.subscribe(topic, qos=1)
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
        offline = json.dumps({"state": "offline", "device": self.device_id, "time": self._wall()}).encode()
        info = client.publish(self.prefix + "status", offline, qos=1, retain=True)
        deadline = self._clock() + self.config.stop_timeout_s
        while not info.is_published() and self._connected and self._clock() < deadline:
            self._wake.wait(0.05)
            self._wake.clear()
            self._take_pubacks()
        self._take_pubacks()
        self._connected = False
        client.disconnect()  # unacknowledged results stay in the outbox and are sent again next time
        self._stop_network()
