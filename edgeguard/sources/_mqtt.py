"""The MQTT input topic (``edgeguard/v1/<fleet>/<device>/input``) for gateway-fed devices.

The link hands the raw payload to :meth:`MqttInputSource.handle` from paho's network thread. That method never
raises and never runs inference there (it would stall the link's keepalive): it queues the bytes on a bounded
queue and a worker thread parses them with the same :func:`parse_body` as the local API (JSON with ``inputs``
or ``image_b64``; a raw ``.npy`` or image payload is sniffed by its magic bytes). The queue is bounded in
messages (``queue_size``) and in bytes (``max_queued_bytes``: 64 messages of a 16 MiB limit would otherwise be
1 GiB); what does not fit is dropped, counted and reported.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from edgeguard._echo import cut
from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import EdgeGuardError, InputRejected

from ._request import BodyLimits, InferenceSink, parse_body

__all__ = ["MqttInputSource"]

_log = logging.getLogger("edgeguard.sources.mqtt")

RejectHandler = Callable[[str, str], None]  # (source, one-line reason)


class MqttInputSource:
    name = "mqtt"

    def __init__(
        self,
        *,
        sink: InferenceSink,
        specs: Callable[[], Sequence[TensorSpec]],
        limits: BodyLimits,
        queue_size: int = 64,
        max_queued_bytes: int | None = None,  # default: 16 MiB, or one max_body_bytes if that is more
        on_reject: RejectHandler | None = None,
    ) -> None:
        if max_queued_bytes is None:
            max_queued_bytes = max(16 * 1024 * 1024, limits.max_body_bytes)
        if not 1 <= queue_size <= 10000:
            raise ValueError("queue_size must be 1..10000")
        if not limits.max_body_bytes <= max_queued_bytes <= 1 << 32:
            raise ValueError("max_queued_bytes must be max_body_bytes .. 4 GiB")
        self._sink = sink
        self._specs = specs
        self._limits = limits
        self._on_reject = on_reject
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0  # received and not yet processed (the link thread adds, the worker subtracts)
        self._bytes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts = {"received": 0, "ok": 0, "rejected": 0, "failed": 0, "dropped_full": 0, "oversize": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="eg-mqtt-input", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (each item was received, not yet acknowledged anywhere), then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def handle(self, payload: bytes) -> None:
        """Called by the link for every message on the input topic; cheap, never raises."""
        self.counts["received"] += 1
        if len(payload) > self._limits.max_body_bytes:
            # Refused before queueing: a flood of huge payloads must not hold memory.
            self.counts["oversize"] += 1
            self._reject(
                f"payload of {len(payload)} bytes exceeds the limit of {self._limits.max_body_bytes}"
            )
            return
        with self._bytes_lock:
            queued = self._queued_bytes
            fits = queued + len(payload) <= self._max_queued_bytes
            if fits:
                self._queued_bytes += len(payload)
        if not fits:
            self.counts["dropped_full"] += 1
            self._reject(f"input queue full ({queued} bytes queued), message dropped")
            return
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self._release(len(payload))
            self.counts["dropped_full"] += 1
            self._reject("input queue full, message dropped")

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def dropped_by_link(self, reason: str) -> None:
        """The link refused a message on the input topic before it reached ``handle`` (over its size limit):
        count and report it like any other refused input."""
        self.counts["received"] += 1
        self.counts["oversize"] += 1
        self._reject(reason)

    def _reject(self, reason: str) -> None:
        reason = cut(reason)  # it may quote the payload: one bounded line per bad message, not 256 KiB
        _log.warning("mqtt input rejected: %s", reason)
        if self._on_reject is not None:
            try:
                self._on_reject("mqtt", reason)
            except Exception:
                _log.exception("reject handler failed")

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            try:
                request = parse_body(
                    body=payload, content_type="", specs=self._specs(), source="mqtt", limits=self._limits
                )
                self._sink(request)
                self.counts["ok"] += 1
            except InputRejected as exc:
                self.counts["rejected"] += 1
                self._reject(str(exc))
            except EdgeGuardError as exc:
                self.counts["failed"] += 1
                _log.warning("mqtt input failed: %s", exc)
            except Exception:
                self.counts["failed"] += 1
                _log.exception("mqtt input failed")
            self._release(len(payload))  # every failure above is caught: this always runs

    def snapshot(self) -> dict[str, Any]:
        return {**self.counts, "queued": self._queue.qsize(), "queued_bytes": self._queued_bytes}
