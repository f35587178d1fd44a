"""The ingest worker: MQTT 5 shared subscription with manual acks -> batches -> PostgreSQL -> acks.

Three threads, each with one job:

- paho's network thread (``loop_start``) receives messages and only appends them to a bounded queue; it never
  touches the database. When the worker holds ``receive_max`` messages (or ``max_pending_bytes``), this
  thread waits for room and stops reading the socket: TCP pushes back and the broker keeps the rest (it is
  also told Receive Maximum, which mosquitto 2.0 honours only until the first acks);
- the writer thread takes batches from the queue, parses them (``_parse``, the gatekeeper), writes them in
  one transaction and, only after COMMIT returned, acknowledges their QoS 1 messages to the broker, in the
  order they arrived (MQTT 5 §4.6). While the database refuses, it retries the same batch with backoff and
  acknowledges nothing, so memory stays bounded and the backlog waits in our persistent session;
- the caller's thread (``run``) writes the status snapshot every ``status_interval_s``.

Exactly once: rows are keyed by the device's ids (``_schema``), inserted with ON CONFLICT DO NOTHING. A crash
between COMMIT and PUBACK means a redelivery, which the key absorbs; a crash before COMMIT loses nothing the
broker acknowledged to the device, because we never acknowledged it.

Acks name a message id that is only meaningful on the connection the message came in on: after a reconnect,
acks for messages of an older connection are not sent (the broker redelivers those, and the key absorbs
the copy), so an ack can never hit a different message that reuses the id.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeguard.errors import ConfigError, DatabaseError
from edgeguard.fleet.ingest._config import IngestConfig
from edgeguard.fleet.ingest._parse import MessageRow, Rejected, ResultRow, parse_message
from edgeguard.fleet.ingest._schema import maintain_partitions, migrate
from edgeguard.fleet.ingest._store import BatchWriter, Written

__all__ = ["IngestWorker"]

log = logging.getLogger("edgeguard.fleet.ingest")

_QOS0_MAX = 1000  # QoS 0 messages (heartbeats) are outside Receive Maximum: their own bound, then dropped


@dataclass(frozen=True, slots=True)
class _Msg:
    conn_gen: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float  # wall clock, stored with the row
    arrived: float  # monotonic, for the lag


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:300]


def _transient(exc: BaseException) -> bool:
    """Connection trouble, timeouts, shutdowns: retry the whole batch later. Anything else the database
    refuses is about the rows themselves (handled one by one)."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


_NEEDS_MQTT5 = (
    "fleet ingest needs an MQTT 5 broker with shared subscriptions (RabbitMQ before 3.13 and NATS speak only "
    "3.1.1; docs/fleet.md, 'What EdgeGuard needs from a broker')"
)


class IngestWorker:
    def __init__(
        self,
        config: IngestConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.timezone.utc).date(),
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        self._today = today
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._queue: collections.deque[_Msg] = collections.deque()  # guarded by _cond
        self._qos0 = 0  # QoS 0 messages in _queue
        # QoS 1 messages received and not yet committed + acknowledged (queue and batch), and their bytes:
        # bounded by receive_max and max_pending_bytes
        self._held = 0
        self._held_bytes = 0
        self._leaving = False
        # Acks are sent only on the connection their messages came in on: the writer checks generation and
        # connectedness and queues the PUBACK under this lock, and paho's callbacks change both under it
        # (paho's reconnect() then discards whatever was queued for the dead connection).
        self._ack_lock = threading.Lock()
        self._conn_gen = 0  # bumped on every CONNACK (paho thread)
        self._mqtt_connected = False
        self._mqtt_subscribed = False
        self._mqtt_error: str | None = None
        self._connack_seen = False  # a CONNACK (any code) arrived on the current connection attempt
        self._mqtt_connects = 0
        self._db: psycopg.Connection[tuple[object, ...]] | None = None
        self._writer: BatchWriter | None = None
        self._db_error: str | None = None
        self._db_down_since: float | None = None
        self._fatal: str | None = None
        self._in_batch: list[_Msg] = []  # taken from the queue, not committed yet (writer thread)
        self._next_maintenance = 0.0
        # All keys exist from the start: status() copies the dict while other threads increment it.
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "inserted",
                "duplicates",
                "rejected",
                "acked",
                "batches",
                "db_errors",
                "full_waits",
                "qos0_dropped",
                "stale_acks_skipped",
            ),
            0,
        )
        self._last_commit: float | None = None
        self._last_e2e_s: float | None = None
        self._client = self._make_client()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- MQTT side
    def _make_client(self) -> mqtt.Client:
        b = self.config.broker
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.ca_file is not None:
            try:
                client.tls_set(
                    ca_certs=str(b.ca_file),
                    certfile=None if b.client_cert is None else str(b.client_cert),
                    keyfile=None if b.client_key is None else str(b.client_key),
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"ingest.broker: TLS files unusable ({b.ca_file}): {exc}") from None
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        self._connack_seen = True
        if rc.is_failure:
            self._mqtt_error = f"broker refused the connection ({rc})"
            if rc.value in (1, 132):  # unacceptable / unsupported protocol version: a 3.1.1-only broker
                self._mqtt_error += f"; {_NEEDS_MQTT5}"
            log.error("ingest: %s", self._mqtt_error)
            return
        with self._ack_lock:
            self._conn_gen += 1
            self._mqtt_connected = True
        self._mqtt_connects += 1
        self._mqtt_error = None
        log.info(
            "ingest: connected to %s:%s (session present: %s)",
            self.config.broker.host,
            self.config.broker.port,
            bool(getattr(flags, "session_present", False)),
        )
        # Subscribed again on every connect: harmless when the session kept them, needed when it expired.
        opts = SubscribeOptions(qos=1)
        client.subscribe([(topic, opts) for topic in self.config.shared_topics])

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        refused = [rc for rc in rcs if rc.is_failure]
        if refused:  # e.g. an ACL, or a broker without shared subscriptions: nothing will arrive
            self._mqtt_error = f"broker refused the subscription ({refused[0]})"
            log.error("ingest: %s", self._mqtt_error)
            return
        self._mqtt_subscribed = True

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if self._mqtt_connected and not self._leaving:
            log.warning("ingest: disconnected from the broker (%s); paho reconnects", rc)
        with self._ack_lock:
            was_connected, self._mqtt_connected = self._mqtt_connected, False
        self._mqtt_subscribed = False
        if not was_connected and not self._connack_seen and not self._leaving:
            # Closed on our MQTT 5 CONNECT without any answer: what RabbitMQ's MQTT plugin before 3.13 does.
            self._mqtt_error = f"broker closed the connection before CONNACK; {_NEEDS_MQTT5}"
        elif rc.is_failure and not (self._mqtt_error or "").startswith("broker refused the connection"):
            self._mqtt_error = f"disconnected ({rc})"
        self._connack_seen = False

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # paho's thread: append and return. Never raises into paho (an exception there ends its loop thread).
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "(topic not UTF-8)"  # queued all the same: rejected and acknowledged in its turn
        item = _Msg(self._conn_gen, msg.mid, msg.qos, topic, bytes(msg.payload), self._wall(), self._clock())
        with self._cond:
            if item.qos == 0:
                if self._qos0 >= _QOS0_MAX:
                    self.counters["qos0_dropped"] += 1
                    return
                self._qos0 += 1
            else:
                # Our own bound, whatever the broker does (mosquitto 2.0 honours Receive Maximum only until
                # the first PUBACKs, then sends its whole backlog): while full, this thread waits here and
                # stops reading the socket, so TCP pushes back and the rest stays with the broker. Pings stop
                # too: a wait longer than 1.5 x keepalive ends the connection, and the broker redelivers what
                # was not acknowledged on the next one (the key absorbs the copies).
                waited = False
                while self._held > 0 and (
                    self._held >= self.config.receive_max
                    or self._held_bytes + len(item.payload) > self.config.max_pending_bytes
                ):
                    if self._stop.is_set():
                        return  # stopping: not acknowledged, so the broker keeps it
                    if not waited:
                        self.counters["full_waits"] += 1
                        waited = True
                    self._cond.wait(0.25)
                self._held += 1
                self._held_bytes += len(item.payload)
            self._queue.append(item)
            self.counters["received"] += 1
            self._cond.notify_all()  # the writer waits on this condition for messages, this thread for room

    # ---------------------------------------------------------------------------------------------- running
    def start(self) -> None:
        self._start_mqtt()
        self._thread = threading.Thread(target=self._writer_main, name="ingest-writer", daemon=True)
        self._thread.start()

    def _start_mqtt(self) -> None:
        b = self.config.broker
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = b.session_expiry_s
        props.ReceiveMaximum = self.config.receive_max
        # The broker must not send us packets much larger than we store (paho would read any size into
        # memory): topic and properties get 64 KiB beyond the largest payload we accept.
        props.MaximumPacketSize = self.config.max_payload_bytes + 65536
        try:
            # connect_async: the first attempt happens in paho's thread and is retried there like any other,
            # so a broker that is down at start is the same condition as one that goes away later.
            self._client.connect_async(
                b.host, b.port, keepalive=b.keepalive_s, clean_start=False, properties=props
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ingest.broker: {exc}") from None
        self._client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch being written (commit + acks), then disconnect. What is still queued stays
        unacknowledged: the broker keeps it for the next worker of the group (or this one, restarted)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._leaving = True
        self._client.disconnect()
        self._client.loop_stop()
        if self._db is not None:
            self._db.close()

    def run(self, stop: threading.Event, on_status: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Start, report status every ``status_interval_s`` until ``stop`` is set (or a fatal error), stop.
        Returns 0, or 1 after a fatal error (its one-line reason logged and in the status)."""
        self.start()
        last_state = ""
        try:
            while not stop.is_set() and self._fatal is None:
                stop.wait(self.config.status_interval_s)
                snap = self.status()
                if snap["state"] != last_state:
                    line = snap["state"] + (f": {snap['reason']}" if snap["reason"] else "")
                    (log.info if snap["state"] == "ok" else log.warning)("ingest: %s", line)
                    last_state = snap["state"]
                if on_status is not None:
                    on_status(snap)
        finally:
            self.stop()
            if on_status is not None:
                on_status(self.status())
        return 0 if self._fatal is None else 1

    @property
    def fatal(self) -> str | None:
        return self._fatal

    # ------------------------------------------------------------------------------------------- the writer
    def _writer_main(self) -> None:
        try:
            backoff = self.config.db_retry_initial_s
            while not self._stop.is_set():
                if not self._in_batch:
                    self._in_batch = self._take_batch()
                    if self._stop.is_set() and not self._in_batch:
                        break
                try:
                    self._ensure_db()
                    self._maybe_maintain()
                    if self._in_batch:
                        self._write_batch(self._in_batch)
                        self._in_batch = []
                    backoff = self.config.db_retry_initial_s
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._db_failed(exc)
                    self._stop.wait(backoff)  # stop() cuts the wait short
                    backoff = min(backoff * 2, self.config.db_retry_max_s)
        except DatabaseError as exc:  # e.g. a schema newer than this EdgeGuard: nothing to retry
            log.error("ingest: %s; stopping", exc)
            self._fatal = _one_line(exc)
            self._stop.set()
        except Exception as exc:  # a bug: stop loudly (traceback in the log), never ack past it
            log.exception("ingest: writer failed")
            self._fatal = _one_line(exc)
            self._stop.set()

    def _take_batch(self) -> list[_Msg]:
        cfg = self.config
        with self._cond:
            if not self._queue:
                self._cond.wait_for(
                    lambda: bool(self._queue) or self._stop.is_set(),
                    timeout=min(1.0, cfg.flush_interval_s * 5),
                )
            if not self._queue:
                return []
            # A batch is full at batch_max, or flush_interval_s after its first message arrived.
            deadline = self._queue[0].arrived + cfg.flush_interval_s
            while len(self._queue) < cfg.batch_max and not self._stop.is_set():
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._queue), cfg.batch_max)
            batch = [self._queue.popleft() for _ in range(n)]
            self._qos0 -= sum(1 for m in batch if m.qos == 0)
        return batch

    def _ensure_db(self) -> None:
        if self._db is not None and not self._db.closed:
            return
        cfg = self.config
        conn = psycopg.connect(
            cfg.dsn,
            autocommit=True,  # every batch is one explicit transaction (BatchWriter.write)
            connect_timeout=cfg.db_connect_timeout_s,
            application_name=f"edgeguard-ingest {cfg.client_id}"[:63],
            # A dead peer (cable, firewall) is noticed in seconds, not after the kernel's two hours.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=int(cfg.db_statement_timeout_s * 1000),
        )
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{int(cfg.db_statement_timeout_s * 1000)}ms",),
            )
            try:
                applied = migrate(conn)
            except RuntimeError as exc:
                raise DatabaseError(str(exc)) from None
            if applied:
                self._next_maintenance = 0.0
        except BaseException:
            conn.close()
            raise
        self._db = conn
        self._writer = BatchWriter(conn, method=cfg.write_method)
        if self._db_error is not None:
            log.info("ingest: database reachable again")
        self._db_error = None
        self._db_down_since = None

    def _maybe_maintain(self) -> None:
        if self._clock() < self._next_maintenance:
            return
        assert self._db is not None
        maintain_partitions(
            self._db,
            today=self._today(),
            retention_days=self.config.retention_days,
            ahead_days=self.config.partitions_ahead_days,
        )
        self._next_maintenance = self._clock() + self.config.maintenance_interval_s

    def _db_failed(self, exc: BaseException) -> None:
        reason = f"database unavailable: {_one_line(exc)}"
        if reason != self._db_error:
            log.error(
                "ingest: %s; holding %d message(s) unacknowledged, retrying", reason, len(self._in_batch)
            )
        self._db_error = reason
        if self._db_down_since is None:
            self._db_down_since = self._clock()
        self.counters["db_errors"] += 1
        if self._db is not None:
            self._db.close()
        self._db = None
        self._writer = None

    def _write_batch(self, batch: list[_Msg]) -> None:
        results: list[ResultRow] = []
        messages: list[MessageRow] = []
        rows: list[tuple[_Msg, ResultRow | MessageRow]] = []
        for m in batch:
            try:
                row = parse_message(
                    m.topic,
                    m.payload,
                    fleet=self.config.fleet,
                    received=m.received,
                    max_payload_bytes=self.config.max_payload_bytes,
                )
            except Rejected as exc:
                self._reject(m, str(exc))
                continue
            rows.append((m, row))
            (results if isinstance(row, ResultRow) else messages).append(row)  # type: ignore[arg-type]
        assert self._writer is not None
        try:
            written = self._writer.write(results, messages)
        except psycopg.Error as exc:
            if _transient(exc):
                raise
            # The database refused something about the rows themselves: find which, one by one.
            log.warning("ingest: batch refused (%s); writing its rows one by one", _one_line(exc))
            written = self._write_one_by_one(rows)
        self._committed(batch, written, results)

    def _write_one_by_one(self, rows: list[tuple[_Msg, ResultRow | MessageRow]]) -> Written:
        assert self._writer is not None
        total = Written()
        for m, row in rows:
            one_r = [row] if isinstance(row, ResultRow) else []
            one_m = [row] if isinstance(row, MessageRow) else []
            try:
                w = self._writer.write(one_r, one_m)
            except psycopg.Error as exc:
                if _transient(exc):
                    raise
                self._reject(m, f"database refused the row: {_one_line(exc)}")
                continue
            total.inserted += w.inserted
            total.duplicates += w.duplicates
        return total

    def _reject(self, m: _Msg, reason: str) -> None:
        # Acknowledged with its batch (after the commit): a message that can never be stored must not block
        # the session forever. One line, no payload content.
        self.counters["rejected"] += 1
        log.warning("ingest: rejected message on %s: %s", m.topic[:200], reason)

    def _committed(self, batch: list[_Msg], written: Written, results: list[ResultRow]) -> None:
        now_wall = self._wall()
        stale = 0
        with self._ack_lock:
            for m in batch:  # arrival order: PUBACKs in the order the PUBLISHes came (MQTT 5 §4.6)
                if m.qos == 0:
                    continue
                if m.conn_gen != self._conn_gen or not self._mqtt_connected:
                    stale += 1  # the broker redelivers it on a later connection; the key absorbs the copy
                    continue
                self._client.ack(m.mid, m.qos)
        held = [m for m in batch if m.qos != 0]
        with self._cond:
            self._held -= len(held)
            self._held_bytes -= sum(len(m.payload) for m in held)
            self._cond.notify_all()  # room for paho's thread
        self.counters["batches"] += 1
        self.counters["inserted"] += written.inserted
        self.counters["duplicates"] += written.duplicates
        self.counters["acked"] += sum(1 for m in batch if m.qos == 1) - stale
        self.counters["stale_acks_skipped"] += stale
        self._last_commit = self._clock()
        if results:
            self._last_e2e_s = max(0.0, now_wall - max(r.created for r in results))

    # --------------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """One consistent snapshot: ``state`` is ok / degraded / failed, ``reason`` says why in one line."""
        now = self._clock()
        with self._cond:
            queued = len(self._queue)
            oldest = self._queue[0].arrived if self._queue else None
        in_batch = list(self._in_batch)
        if in_batch:
            oldest = min(oldest, in_batch[0].arrived) if oldest is not None else in_batch[0].arrived
        pending = queued + len(in_batch)
        lag = 0.0 if oldest is None else max(0.0, now - oldest)
        reasons = []
        if self._fatal is not None:
            reasons.append(self._fatal)
        if self._db_error is not None:
            reasons.append(self._db_error)
        if not self._mqtt_connected:
            reasons.append(f"broker not connected{': ' + self._mqtt_error if self._mqtt_error else ''}")
        elif not self._mqtt_subscribed:
            reasons.append(self._mqtt_error or "not subscribed yet")
        state = "failed" if self._fatal else ("degraded" if reasons else "ok")
        return {
            "state": state,
            "reason": "; ".join(reasons) if reasons else None,
            "time": round(self._wall(), 3),
            "client_id": self.config.client_id,
            "group": self.config.group,
            "fleet": self.config.fleet,
            "mqtt": {
                "connected": self._mqtt_connected,
                "subscribed": self._mqtt_subscribed,
                "connects": self._mqtt_connects,
            },
            "db": {
                "connected": self._db is not None and self._db_error is None,
                "error": self._db_error,
                "down_for_s": None if self._db_down_since is None else round(now - self._db_down_since, 3),
            },
            "pending": pending,
            "lag_s": round(lag, 3),
            "last_commit_age_s": None if self._last_commit is None else round(now - self._last_commit, 3),
            "e2e_last_s": None if self._last_e2e_s is None else round(self._last_e2e_s, 3),
            "counters": dict(self.counters),
        }
