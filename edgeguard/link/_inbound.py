"""The MQTT inbound trust boundary: exact topic match, size limit, handler failures contained."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgeguard._echo import ECHO_MAX_CHARS, cut
from edgeguard.link._config import TOPIC_SEGMENT

__all__ = ["InboundRouter"]

log = logging.getLogger("edgeguard.link")


class InboundRouter:
    """Maps exact topics to handlers. ``deliver`` runs on the link thread (inside paho's loop_read) and never
    raises; ``add`` may be called from any thread."""

    def __init__(self, prefix: str, max_bytes: int) -> None:
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[Callable[[bytes], None], int, Callable[[str], None] | None]] = {}

    def add(
        self,
        suffix: str,
        callback: Callable[[bytes], None],
        max_bytes: int | None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        if not all(TOPIC_SEGMENT.fullmatch(part) for part in suffix.split("/")):
            raise ValueError(f"inbound topic suffix {suffix!r}: levels of [A-Za-z0-9_.-], no wildcards")
        limit = min(max_bytes or self.max_bytes, self.max_bytes)
        with self._lock:
            self._routes[self.prefix + suffix] = (callback, limit, on_drop)

    def topics(self) -> list[str]:
        """Every topic to subscribe to."""
        with self._lock:
            return list(self._routes)

    def deliver(self, topic: str, payload: bytes) -> None:
        with self._lock:
            entry = self._routes.get(topic)
        if entry is None:
            self._drop(topic, "no handler for this topic")
            return
        callback, limit, on_drop = entry
        if len(payload) > limit:
            self._drop(topic, f"payload of {len(payload)} bytes exceeds the limit of {limit}", on_drop)
            return
        try:
            callback(payload)
        except Exception as exc:  # a bad message must never raise into paho's callback
            self._drop(topic, f"handler failed: {type(exc).__name__}: {exc}", on_drop)

    def oversize(self, topic: str, size: int) -> None:
        """A packet over the link's limit was read and thrown away without buffering it (see _bounded.py):
        count and report it like any other dropped message, to the topic's owner if it has one."""
        with self._lock:
            entry = self._routes.get(topic)
        why = f"packet of {size} bytes exceeds the limit of {entry[1] if entry else self.max_bytes} bytes"
        self._drop(topic[:200], why, entry[2] if entry else None)

    def _drop(self, topic: str, why: str, on_drop: Callable[[str], None] | None = None) -> None:
        """Count and log a dropped message, and tell the topic's owner (which reports it as an event)."""
        self.dropped += 1
        log.warning("link: inbound message on %s dropped: %s", cut(topic, ECHO_MAX_CHARS), cut(why))
        if on_drop is not None:
            try:
                on_drop(why)
            except Exception:
                log.exception("link: inbound drop handler failed")
