"""The fleet as the operator sees it, built in memory from what the devices publish.

``FleetState.ingest`` is the one place where the devices' MQTT messages (untrusted: any client allowed to
publish under the fleet prefix can send anything) become view state. It checks, in order: the topic shape
(``edgeguard/v1/<fleet>/<device>/<kind>`` with the link's segment charset, kind one of status / heartbeat /
events), the payload size, JSON that is an object; every field is then read with its type checked, and a field
of the wrong type is treated as absent. A message that fails is counted in ``dropped`` and ignored. The
number of devices is bounded (``max_devices``): a flood of invented device ids is counted, never stored.

Time is a parameter (``now``, wall clock seconds) so tests control heartbeat ages and rates.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeviceView", "FleetEvent", "FleetState", "SECURITY_EVENTS", "parse_topic", "read_site"]

# The link's TOPIC_SEGMENT (edgeguard/link/_config.py), repeated: operator code imports nothing device-side.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KINDS = ("status", "heartbeat", "events")
# Fleet-wide topics beside the devices' own (docs/deploy contract): never a device id.
RESERVED = frozenset({"rollouts", "bundles"})
# Event kinds that concern security (the rest are reliability events: degraded, reloaded, outbox_dropped...).
SECURITY_EVENTS = frozenset(
    {"bundle-rejected", "input-rejected", "command-rejected", "command-forged", "posture-finding"}
)
_TEXT_MAX = 200  # a reason or model name longer than this is cut: the table and metrics stay readable


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(fleet, device, kind) of a device topic the view follows, or None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "edgeguard" or parts[1] != "v1" or parts[4] not in _KINDS:
        return None
    if not (_SEGMENT.fullmatch(parts[2]) and _SEGMENT.fullmatch(parts[3])) or parts[3] in RESERVED:
        return None
    return parts[2], parts[3], parts[4]


def _num(doc: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    if isinstance(doc, bool) or not isinstance(doc, (int, float)):
        return None
    return float(doc)


def _text(doc: Any, *path: str) -> str | None:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc[:_TEXT_MAX] if isinstance(doc, str) else None


@dataclass(frozen=True)
class FleetEvent:
    """One thing that happened, for ``fleet watch``: a device event, or a status change seen by the view."""

    time: float
    fleet: str
    device: str
    kind: str
    reason: str | None
    security: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "fleet": self.fleet,
            "device": self.device,
            "kind": self.kind,
            "reason": self.reason,
            "security": self.security,
        }


@dataclass
class DeviceView:
    fleet: str
    device: str
    online: bool | None = None  # None: heartbeats seen, no status yet
    since: float | None = None  # when the view first saw the current online/offline state
    last_heartbeat: float | None = None  # receive time (operator's clock: device clocks may be wrong)
    heartbeat_interval_s: float | None = None  # between the last two heartbeats, as received
    groups: tuple[str, ...] = ()
    model: str | None = None
    version: int | None = None
    backend: str | None = None
    accelerator: str | None = None
    state: str | None = None  # serving / no-model / safe
    degraded: bool = False
    degraded_reason: str | None = None
    inferences: float | None = None
    rate: float | None = None  # inferences per second between the last two heartbeats
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    rejected: float | None = None
    outbox_depth: float | None = None
    outbox_oldest_age_s: float | None = None
    outbox_dropped: float | None = None
    outbox_alarm: str | None = None
    uptime_s: float | None = None
    restarts: float | None = None
    mtbf_s: float | None = None
    mttr_s: float | None = None
    last_security: str | None = None
    last_security_at: float | None = None
    site: dict[str, Any] | None = None  # the heartbeat's sources.group, fields type-checked (read_site)
    _prev: tuple[float, float] | None = field(default=None, repr=False)  # (uptime, inferences) of the last hb

    def heartbeat_age(self, now: float) -> float | None:
        return None if self.last_heartbeat is None else max(0.0, now - self.last_heartbeat)

    def problems(self, now: float, stale_after_s: float) -> list[str]:
        """Why this device needs attention, most serious first (empty: it is fine)."""
        out: list[str] = []
        if self.online is False:
            out.append("offline")
        age = self.heartbeat_age(now)
        if self.online and age is not None and age > self._stale_limit(stale_after_s):
            out.append(f"no heartbeat for {age:.0f} s")
        if self.degraded:
            out.append(f"degraded: {self.degraded_reason or 'no reason given'}")
        if self.outbox_alarm:
            out.append(f"outbox: {self.outbox_alarm}")
        return out

    def _stale_limit(self, stale_after_s: float) -> float:
        # Three missed heartbeats at the rate the device itself keeps, never less than the operator's floor.
        interval = self.heartbeat_interval_s
        return max(stale_after_s, 3 * interval) if interval is not None else stale_after_s

    def to_json(self, now: float, stale_after_s: float) -> dict[str, Any]:
        age = self.heartbeat_age(now)
        return {
            "fleet": self.fleet,
            "device": self.device,
            "online": self.online,
            "since": self.since,
            "heartbeat_age_s": None if age is None else round(age, 3),
            "groups": list(self.groups),
            "model": self.model,
            "version": self.version,
            "backend": self.backend,
            "accelerator": self.accelerator,
            "state": self.state,
            "degraded": self.degraded,
            "degraded_reason": self.degraded_reason,
            "inferences": self.inferences,
            "inferences_per_s": self.rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "rejected": self.rejected,
            "outbox_depth": self.outbox_depth,
            "outbox_oldest_age_s": self.outbox_oldest_age_s,
            "outbox_dropped": self.outbox_dropped,
            "outbox_alarm": self.outbox_alarm,
            "uptime_s": self.uptime_s,
            "restarts": self.restarts,
            "mtbf_s": self.mtbf_s,
            "mttr_s": self.mttr_s,
            "last_security_event": self.last_security,
            "last_security_at": self.last_security_at,
            "site": self.site,
            "problems": self.problems(now, stale_after_s),
        }


class FleetState:
    """Every device seen, thread-safe (paho's thread writes, the table / exporter read a snapshot)."""

    def __init__(
        self,
        *,
        max_devices: int = 100_000,
        max_payload_bytes: int = 262_144,
        max_events: int = 1000,
        stale_after_s: float = 90.0,
    ) -> None:
        if max_devices < 1 or max_payload_bytes < 1 or max_events < 1 or stale_after_s <= 0:
            raise ValueError("fleet view limits must be positive")
        self.max_devices = max_devices
        self.max_payload_bytes = max_payload_bytes
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], DeviceView] = {}
        self._events: deque[FleetEvent] = deque(maxlen=max_events)  # newest kept, oldest forgotten
        self.dropped = 0  # messages refused (bad topic, too large, not JSON, not an object)
        self.devices_refused = 0  # messages from devices beyond max_devices
        self.messages = 0

    # ------------------------------------------------------------------------------------------ ingest
    def ingest(self, topic: str, payload: bytes, now: float, *, retained: bool = False) -> FleetEvent | None:
        """Take one message; returns the event it represents for ``watch`` (a device event or a status
        change), or None. ``retained``: the broker's stored copy (of a status), not news. Never raises on
        bad input."""
        parsed = parse_topic(topic)
        if parsed is None or len(payload) > self.max_payload_bytes:
            self._drop()
            return None
        try:
            doc = json.loads(payload)
        except ValueError:  # UnicodeDecodeError is a ValueError too
            self._drop()
            return None
        if not isinstance(doc, dict):
            self._drop()
            return None
        fleet, device, kind = parsed
        if kind == "status" and doc.get("state") not in ("online", "offline"):
            self._drop()  # before the device is created: a bad status must not invent a device
            return None
        with self._lock:
            self.messages += 1
            view = self._devices.get((fleet, device))
            if view is None:
                if len(self._devices) >= self.max_devices:
                    self.devices_refused += 1
                    return None
                view = self._devices[(fleet, device)] = DeviceView(fleet=fleet, device=device)
            if kind == "status":
                return self._status(view, doc, now, retained)
            if kind == "heartbeat":
                return self._heartbeat(view, doc, now)
            return self._event(view, doc, now)

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def _status(self, view: DeviceView, doc: dict[str, Any], now: float, retained: bool) -> FleetEvent | None:
        state = str(doc.get("state"))
        online = state == "online"
        if view.online == online:
            return None
        # Since when: the device's own time in its birth or goodbye; the LWT has none (the broker sends it as
        # given at connect), so a live one is dated on arrival and a retained one stays unknown.
        stamp = _num(doc, "time")
        view.online, view.since = online, stamp if stamp is not None else (None if retained else now)
        return FleetEvent(now, view.fleet, view.device, state, None, False)

    def _heartbeat(self, view: DeviceView, doc: dict[str, Any], now: float) -> FleetEvent | None:
        if view.last_heartbeat is not None and now > view.last_heartbeat:
            view.heartbeat_interval_s = now - view.last_heartbeat
        view.last_heartbeat = now
        groups = doc.get("groups")
        if isinstance(groups, list):
            view.groups = tuple(g[:64] for g in groups[:16] if isinstance(g, str))
        view.site = read_site(doc.get("sources"))
        if view.site is not None and view.site["group"] not in view.groups:
            view.groups = (*view.groups, view.site["group"])[:16]
        model = doc.get("model")
        view.model = _text(model, "name")
        version = _num(model, "version")
        view.version = None if version is None else int(version)
        view.backend, view.accelerator = _text(doc, "backend"), _text(doc, "accelerator")
        view.state = _text(doc, "state")
        was_degraded = view.degraded
        view.degraded = doc.get("degraded") is True
        view.degraded_reason = _text(doc, "degraded_reason") if view.degraded else None
        uptime, count = _num(doc, "uptime_s"), _num(doc, "inferences")
        view.rate = None
        if uptime is not None and count is not None and view._prev is not None:
            d_up, d_count = uptime - view._prev[0], count - view._prev[1]
            # A restart resets both counters: no rate for that interval rather than a negative one.
            if d_up > 0 and d_count >= 0:
                view.rate = round(d_count / d_up, 3)
        view._prev = (uptime, count) if uptime is not None and count is not None else None
        view.uptime_s, view.inferences = uptime, count
        view.latency_p50_ms = _num(doc, "latency_ms", "p50")
        view.latency_p99_ms = _num(doc, "latency_ms", "p99")
        view.rejected = _num(doc, "rejected")
        view.outbox_depth = _num(doc, "outbox", "depth")
        view.outbox_oldest_age_s = _num(doc, "outbox", "oldest_age_s")
        view.outbox_dropped = _num(doc, "outbox", "dropped_total")
        view.outbox_alarm = _text(doc, "outbox", "alarm") or None
        view.restarts = _num(doc, "supervisor", "restarts")
        view.mtbf_s = _num(doc, "supervisor", "mtbf_s")
        view.mttr_s = _num(doc, "supervisor", "mttr_s")
        if view.online is None:
            # Heartbeats flow only over a live session: the device is online even if its retained status
            # has not reached us (a broker without retained messages, or one that lost them).
            view.online, view.since = True, now
        if view.degraded and not was_degraded:
            return FleetEvent(now, view.fleet, view.device, "degraded", view.degraded_reason, False)
        return None

    def _event(self, view: DeviceView, doc: dict[str, Any], now: float) -> FleetEvent | None:
        kind = _text(doc, "kind") or "unknown"
        reason = _text(doc, "reason") or _text(doc, "check")
        security = kind in SECURITY_EVENTS
        if security:
            view.last_security = f"{kind}: {reason}" if reason else kind
            view.last_security_at = now
        event = FleetEvent(now, view.fleet, view.device, kind, reason, security)
        self._events.append(event)
        return event

    # -------------------------------------------------------------------------------------------- read
    def snapshot(self) -> list[DeviceView]:
        """Copies of every device, taken under the lock: one consistent picture (one scrape, one table)."""
        with self._lock:
            return [_copy(v) for v in self._devices.values()]

    def device(self, fleet: str, device: str) -> DeviceView | None:
        """A copy of one device's view, or None when the view does not know it."""
        with self._lock:
            view = self._devices.get((fleet, device))
            return _copy(view) if view is not None else None

    def events(self) -> list[FleetEvent]:
        with self._lock:
            return list(self._events)

    def groups_of(self, fleet: str, device: str) -> tuple[str, ...]:
        """One device's groups (a dict lookup: ``watch --group`` asks once per event)."""
        with self._lock:
            view = self._devices.get((fleet, device))
            return view.groups if view is not None else ()

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def heartbeats_seen(self) -> int:
        with self._lock:
            return sum(1 for v in self._devices.values() if v.last_heartbeat is not None)


_SITE_COUNTS = ("served", "redelivered", "rejected", "failed", "queued", "joins", "leaves", "connects",
                "overrun", "requeued")


def read_site(sources: Any) -> dict[str, Any] | None:
    """The group member's state from a heartbeat's ``sources.group`` (docs/sites.md), every field checked:
    a wrong type is absent; at most 16 streams."""
    doc = sources.get("group") if isinstance(sources, dict) else None
    group = _text(doc, "group")
    if not isinstance(doc, dict) or group is None or not _SEGMENT.fullmatch(group):
        return None
    share = _text(doc, "share")
    out: dict[str, Any] = {
        "group": group,
        "share": share if share in ("joined", "left") else None,
        "reason": _text(doc, "reason"),
        "connected": doc.get("connected") is True,
        "error": _text(doc, "error"),
    }
    for key in _SITE_COUNTS:
        value = _num(doc, key)
        out[key] = None if value is None else int(value)
    streams: dict[str, Any] = {}
    raw = doc.get("streams")
    if isinstance(raw, dict):
        for name, s in list(raw.items())[:16]:
            if isinstance(name, str) and _SEGMENT.fullmatch(name) and isinstance(s, dict):
                token, takeovers = _num(s, "fencing_token"), _num(s, "takeovers")
                streams[name] = {
                    "holder": _text(s, "holder"),
                    "fencing_token": None if token is None else int(token),
                    "serving": s.get("serving") is True,
                    "takeovers": None if takeovers is None else int(takeovers),
                }
    out["streams"] = streams
    return out


def _copy(view: DeviceView) -> DeviceView:
    return DeviceView(**{f: getattr(view, f) for f in view.__dataclass_fields__})
