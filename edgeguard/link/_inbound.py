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
        # Subtrees subscribed with ``<topic prefix>#`` (a bundle being fetched): full topic prefix (ending in
        # "/") -> handler of (the one level below it, payload). Only one level deep is delivered.
        self._subtrees: dict[str, tuple[Callable[[str, bytes], None], int, list[str]]] = {}

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

    def add_subtree(
        self, topic_prefix: str, callback: Callable[[str, bytes], None], max_bytes: int, level: str
    ) -> str:
        """Deliver ``<topic_prefix><level>`` (one level, any name) to ``callback(level, payload)``; returns
        the filter to subscribe to: ``<topic_prefix><level>``, ``level`` being one name or ``+``. Called again
        for the same prefix, it adds a filter (a bundle's meta first, then its chunks). ``topic_prefix`` is a
        full topic ending in "/" (it need not be under this device's prefix: bundles are fleet-wide)."""
        levels = topic_prefix.removesuffix("/").split("/")
        if not topic_prefix.endswith("/") or not all(TOPIC_SEGMENT.fullmatch(p) for p in levels):
            raise ValueError(f"inbound subtree {topic_prefix!r}: levels of [A-Za-z0-9_.-] ending in /")
        if level != "+" and not TOPIC_SEGMENT.fullmatch(level):
            raise ValueError(f"inbound subtree level {level!r}: + or one level of [A-Za-z0-9_.-]")
        with self._lock:
            old = self._subtrees.get(topic_prefix)
            filters = list(old[2]) if old is not None else []
            if topic_prefix + level not in filters:
                filters.append(topic_prefix + level)
            self._subtrees[topic_prefix] = (callback, min(max_bytes, self.max_bytes), filters)
        return topic_prefix + level

    def remove_subtree(self, topic_prefix: str, level: str | None = None) -> list[str]:
        """Stop delivering a subtree (``level`` None), or only stop subscribing to one of its filters (a
        chunk already on disk: what is still in flight on it is delivered, and skipped by its owner); the
        filters to unsubscribe from."""
        with self._lock:
            if level is None:
                gone = self._subtrees.pop(topic_prefix, None)
                return gone[2] if gone is not None else []
            entry = self._subtrees.get(topic_prefix)
            if entry is None or topic_prefix + level not in entry[2]:
                return []
            entry[2].remove(topic_prefix + level)
            return [topic_prefix + level]

    def topics(self) -> list[str]:
        """Every topic (and subtree filter, in the order they were added) to subscribe to."""
        with self._lock:
            return list(self._routes) + [f for entry in self._subtrees.values() for f in entry[2]]

    def _subtree_of(self, topic: str) -> tuple[Callable[[str, bytes], None], int, str] | None:
        head, sep, level = topic.rpartition("/")
        if not sep:
            return None
        with self._lock:
            entry = self._subtrees.get(head + "/")
        return None if entry is None else (entry[0], entry[1], level)

    def deliver(self, topic: str, payload: bytes) -> None:
        with self._lock:
            entry = self._routes.get(topic)
        if entry is None:
            sub = self._subtree_of(topic)
            if sub is None:
                self._drop(topic, "no handler for this topic")
                return
            handler, limit, level = sub
            if len(payload) > limit:
                self._drop(topic, f"payload of {len(payload)} bytes exceeds the limit of {limit}")
                return
            try:
                handler(level, payload)
            except Exception as exc:  # a bad message must never raise into paho's callback
                self._drop(topic, f"handler failed: {type(exc).__name__}: {exc}")
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
