"""What the dashboard adds to the fleet view's state: short histories for sparklines, the last results, the
rollouts, and which devices changed since the page was last told.

``FleetState`` (edgeguard/fleet/view) stays the one parser of status, heartbeats and events; this module
sees each message after it (``Follower``'s ``on_message`` hook, in paho's thread) and reads the device's
checked view back from the state rather than parsing the heartbeat a second time. Results and rollout
messages, which the view does not follow, are read here: a result is kept only for a device the state knows
(so ``max_devices`` bounds it too), cut to ``result_bytes``; rollouts go through ``RolloutBook``'s gatekeeper.

Everything is bounded: ``history`` points per device, ``results`` per device, ``RolloutBook`` capacity, and
the set of changed devices (at most every device the state holds). The site groups (members, share, load,
failovers, stream holders) are ``fleet status --groups``'s rows, from the heartbeats' ``sources.group``; an
update carries them when they changed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgeguard.fleet.view import DeviceView, FleetEvent, FleetState
from edgeguard.fleet.view._groups import group_rows
from edgeguard.fleet.view._state import _SEGMENT

from ._rollouts import RolloutBook

__all__ = ["LiveFleet", "device_status"]

Key = tuple[str, str]


def device_status(row: dict[str, Any]) -> str:
    """The one colour a device gets: offline (red), degraded (amber: any problem while online), online."""
    if row["online"] is False:
        return "offline"
    return "degraded" if row["problems"] else "online"


def _split(topic: str) -> tuple[str, str, str] | None:
    """(fleet, second-to-last level, last level) of ``edgeguard/v1/<fleet>/<a>/<b>``, or None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[:2] != ["edgeguard", "v1"]:
        return None
    if not all(_SEGMENT.fullmatch(p) for p in parts[2:]):
        return None
    return parts[2], parts[3], parts[4]


class LiveFleet:
    def __init__(
        self,
        state: FleetState,
        *,
        history: int = 60,
        results: int = 5,
        result_bytes: int = 2048,
        events_kept: int = 200,
        rollouts: int = 64,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if min(history, results, result_bytes, events_kept) < 1:
            raise ValueError("dashboard limits must be positive")
        self.state = state
        self.history_len, self.results_len, self.result_bytes = history, results, result_bytes
        self._wall = wall
        self._lock = threading.Lock()
        self._history: dict[Key, deque[tuple[float, float | None, float | None, float | None]]] = {}
        self._results: dict[Key, deque[dict[str, Any]]] = {}
        self._events: deque[FleetEvent] = deque(maxlen=events_kept)  # device events and status changes
        self._new_events: deque[FleetEvent] = deque(maxlen=events_kept)  # not yet pushed to the pages
        self.rollouts = RolloutBook(rollouts)
        self._changed: set[Key] = set()
        self._rollouts_changed = False
        self._groups: list[dict[str, Any]] = []  # the groups the open pages were last sent
        self._problems: dict[Key, tuple[str, ...]] = {}

    # paho's thread ---------------------------------------------------------------------------------
    def on_event(self, event: FleetEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._new_events.append(event)

    def on_message(self, topic: str, payload: bytes, now: float, _retained: bool) -> None:
        """Never raises: a bad message is counted where it is parsed and otherwise ignored."""
        parts = _split(topic)
        if parts is None:
            return
        fleet, a, b = parts
        if a == "rollouts":
            with self._lock:
                if self.rollouts.take(fleet, b, payload):
                    self._rollouts_changed = True
            return
        key = (fleet, a)
        view = self.state.device(fleet, a)
        if view is None:
            return  # unknown device (never seen, or refused by max_devices): nothing stored for it
        if b == "heartbeat":
            point = (now, view.latency_p50_ms, view.rate, view.outbox_depth)
            with self._lock:
                hist = self._history.get(key)
                if hist is None:
                    hist = self._history[key] = deque(maxlen=self.history_len)
                if not hist or hist[-1][0] != now or point != hist[-1]:
                    hist.append(point)
                self._changed.add(key)
        elif b == "results":
            summary = self._result_summary(payload, now)
            with self._lock:
                kept = self._results.get(key)
                if kept is None:
                    kept = self._results[key] = deque(maxlen=self.results_len)
                kept.append(summary)
                self._changed.add(key)
        elif b in ("status", "events"):
            with self._lock:
                self._changed.add(key)

    def _result_summary(self, payload: bytes, now: float) -> dict[str, Any]:
        # Shown as text, never interpreted: cut to result_bytes, and the id / time read only when typed right.
        text = payload[: self.result_bytes].decode("utf-8", errors="replace")
        out: dict[str, Any] = {"received": now, "text": text, "cut": len(payload) > self.result_bytes}
        if len(payload) <= self.state.max_payload_bytes:
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                if isinstance(doc.get("id"), str):
                    out["id"] = doc["id"][:128]
                data = doc.get("data")
                if data is not None:
                    compact = json.dumps(data, separators=(",", ":"))
                    out["text"] = compact[: self.result_bytes]
                    out["cut"] = len(compact) > self.result_bytes
        return out

    # the server's loop -------------------------------------------------------------------------------
    def row(self, view: DeviceView, now: float) -> dict[str, Any]:
        row = view.to_json(now, self.state.stale_after_s)
        row["last_heartbeat"] = view.last_heartbeat
        row["status"] = device_status(row)
        with self._lock:
            hist = list(self._history.get((view.fleet, view.device), ()))
        row["history"] = {
            "t": [round(p[0], 1) for p in hist],
            "latency_ms": [p[1] for p in hist],
            "rate": [p[2] for p in hist],
            "outbox": [p[3] for p in hist],
        }
        return row

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows (a new page starts from this). It leaves the changes alone: pages
        already open still get them, and a new page applying a change it already has is harmless."""
        now = self._wall()
        views = self.state.snapshot()
        rows = [self.row(v, now) for v in views]
        with self._lock:
            events = [e.to_json() for e in self._events]
            rollouts = self.rollouts.all()
        groups = group_rows(views)  # self._groups stays what the open pages were sent
        return {"type": "snapshot", "now": now, "devices": rows, "events": events, "rollouts": rollouts,
                "groups": groups, **self._counters()}

    def changes(self) -> dict[str, Any] | None:
        """The devices that changed (a message, or a problem that appeared or went with time), new events
        and rollouts since the last call; None when nothing did."""
        now = self._wall()
        views = self.state.snapshot()
        rows: list[dict[str, Any]] = []
        with self._lock:
            changed, self._changed = self._changed, set()
            events = [e.to_json() for e in self._new_events]
            self._new_events.clear()
            rollouts = self.rollouts.all() if self._rollouts_changed else None
            self._rollouts_changed = False
        for view in views:
            key = (view.fleet, view.device)
            problems = tuple(view.problems(now, self.state.stale_after_s))
            if key in changed or self._problems.get(key) != problems:
                self._problems[key] = problems
                rows.append(self.row(view, now))
        groups = group_rows(views) if rows else self._groups  # only a device's change changes them
        if not rows and not events and rollouts is None:
            return None
        doc: dict[str, Any] = {"type": "update", "now": now, "devices": rows, "events": events,
                               **self._counters()}
        if rollouts is not None:
            doc["rollouts"] = rollouts
        if groups != self._groups:
            doc["groups"] = self._groups = groups
        return doc

    def _counters(self) -> dict[str, Any]:
        return {
            "dropped": self.state.dropped,
            "devices_refused": self.state.devices_refused,
            "rollouts_rejected": self.rollouts.rejected,
        }

    def detail(self, fleet: str, device: str) -> dict[str, Any] | None:
        view = self.state.device(fleet, device)
        if view is None:
            return None
        now = self._wall()
        with self._lock:
            results = list(self._results.get((fleet, device), ()))
            events = [e.to_json() for e in self._events if e.fleet == fleet and e.device == device]
        return {"now": now, "device": self.row(view, now), "results": results[::-1], "events": events[::-1]}
