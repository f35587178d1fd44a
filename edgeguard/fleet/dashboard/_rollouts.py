"""Rollout progress as the dashboard shows it: the one reader of retained ``P/rollouts/<id>`` messages.

The operator's rollout tool publishes them (docs/operators.md, "Rollout progress" in the deploy contract), but
anyone the broker lets write under the fleet prefix could publish there, so ``parse_rollout_unverified``
treats the bytes as untrusted and checks, in order: the payload size, JSON that is an object, ``v`` == 1,
the id (the contract's charset, and the same as the topic's last level), every field's type, then the bounds
(waves, devices per wave, text lengths). Any failure is one ``RolloutRejected`` with the reason; the
caller counts it and keeps the previous state. An empty retained payload removes the rollout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Rollout", "RolloutRejected", "RolloutBook", "parse_rollout_unverified"]

ROLLOUT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DEVICE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STATES = frozenset({"running", "halted", "done", "aborted"})
_WAVE_STATES = frozenset({"pending", "deploying", "probation", "passed", "failed"})
MAX_ROLLOUT_BYTES = 512 * 1024
MAX_WAVES = 64
MAX_WAVE_DEVICES = 10_000
_TEXT_MAX = 200


class RolloutRejected(ValueError):
    """A rollout progress message the dashboard does not show (the reason in one line)."""


@dataclass(frozen=True)
class Rollout:
    id: str
    doc: dict[str, Any]  # the checked, normalised document the page renders


def _want(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise RolloutRejected(f"field {key!r}: expected {getattr(kind, '__name__', kind)}")
    if isinstance(value, str) and len(value) > _TEXT_MAX:
        value = value[:_TEXT_MAX]
    return value


def _ids(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_WAVE_DEVICES:
        raise RolloutRejected(f"{what}: expected a list of at most {MAX_WAVE_DEVICES} device ids")
    if not all(isinstance(d, str) and _DEVICE.fullmatch(d) for d in value):
        raise RolloutRejected(f"{what}: not a device id")
    return list(value)


def _wave(raw: Any, n: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RolloutRejected(f"wave {n}: not an object")
    state = _want(raw, "state", str)
    if state not in _WAVE_STATES:
        raise RolloutRejected(f"wave {n}: unknown state {state[:32]!r}")
    failed = raw.get("failed", {})
    if not isinstance(failed, dict) or len(failed) > MAX_WAVE_DEVICES:
        raise RolloutRejected(f"wave {n}: 'failed' must be an object of device -> reason")
    failed_out: dict[str, str] = {}
    for device, why in failed.items():
        if not _DEVICE.fullmatch(device) or not isinstance(why, str):
            raise RolloutRejected(f"wave {n}: 'failed' must be an object of device -> reason")
        failed_out[device] = why[:_TEXT_MAX]
    until = _want(raw, "probation_until", (int, float), optional=True)
    percent = _want(raw, "percent", int)
    if not 0 <= percent <= 100:
        raise RolloutRejected(f"wave {n}: percent must be 0..100")
    return {
        "index": _want(raw, "index", int),
        "percent": percent,
        "devices": _ids(raw.get("devices"), f"wave {n} devices"),
        "state": state,
        "probation_until": until,
        "ok": _ids(raw.get("ok", []), f"wave {n} ok"),
        "failed": failed_out,
        "rolled_back": _ids(raw.get("rolled_back", []), f"wave {n} rolled_back"),
    }


def parse_rollout_unverified(topic_id: str, payload: bytes) -> Rollout:
    """The rollout a ``P/rollouts/<topic_id>`` message describes, checked (module docstring)."""
    if len(payload) > MAX_ROLLOUT_BYTES:
        raise RolloutRejected(f"larger than {MAX_ROLLOUT_BYTES} bytes")
    try:
        doc = json.loads(payload)
    except ValueError:
        raise RolloutRejected("not JSON") from None
    if not isinstance(doc, dict):
        raise RolloutRejected("not a JSON object")
    if doc.get("v") != 1:
        raise RolloutRejected("unknown format version (v must be 1)")
    rid = _want(doc, "id", str)
    if not ROLLOUT_ID.fullmatch(rid) or rid != topic_id:
        raise RolloutRejected("id does not match the topic")
    state = _want(doc, "state", str)
    if state not in _STATES:
        raise RolloutRejected(f"unknown state {state[:32]!r}")
    waves = doc.get("waves")
    if not isinstance(waves, list) or len(waves) > MAX_WAVES:
        raise RolloutRejected(f"waves: expected a list of at most {MAX_WAVES}")
    sha = _want(doc, "sha256", str)
    return Rollout(
        rid,
        {
            "id": rid,
            "model": _want(doc, "model", str),
            "version": _want(doc, "version", int),
            "sha256": sha[:64],
            "group": _want(doc, "group", str),
            "state": state,
            "max_failures": _want(doc, "max_failures", int),
            "failures": _want(doc, "failures", int),
            "started": _want(doc, "started", (int, float)),
            "updated": _want(doc, "updated", (int, float)),
            "reason": _want(doc, "reason", str, optional=True),
            "waves": [_wave(w, i) for i, w in enumerate(waves)],
        },
    )


class RolloutBook:
    """The rollouts the dashboard knows, at most ``capacity``: when full, a new one replaces the finished
    rollout updated longest ago; with none finished, the new one is refused (counted)."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._by_key: dict[tuple[str, str], dict[str, Any]] = {}
        self.rejected = 0
        self.last_rejection: str | None = None

    def take(self, fleet: str, topic_id: str, payload: bytes) -> bool:
        """Apply one retained message; True when what the page shows changed. Never raises."""
        key = (fleet, topic_id)
        if not payload:
            return self._by_key.pop(key, None) is not None
        try:
            rollout = parse_rollout_unverified(topic_id, payload)
        except RolloutRejected as exc:
            self.rejected += 1
            self.last_rejection = f"{fleet}/{topic_id[:64]}: {exc}"
            return False
        if key not in self._by_key and len(self._by_key) >= self.capacity:
            finished = [k for k, d in self._by_key.items() if d["state"] in ("done", "aborted")]
            if not finished:
                self.rejected += 1
                self.last_rejection = f"{fleet}/{topic_id}: more than {self.capacity} rollouts"
                return False
            del self._by_key[min(finished, key=lambda k: self._by_key[k]["updated"])]
        self._by_key[key] = {**rollout.doc, "fleet": fleet}
        return True

    def all(self) -> list[dict[str, Any]]:
        """Newest first."""
        return sorted(self._by_key.values(), key=lambda d: d["updated"], reverse=True)
