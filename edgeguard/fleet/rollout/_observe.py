"""The ONLY place the rollout reads what devices publish: MQTT bytes in, typed observations out.

Three topics matter (``<prefix>/<device>/...``): ``cmd/resp`` (signed answers, verified with the device's
pinned key by :func:`edgeguard.fleet.commands.check_answer`), ``heartbeat`` (its ``deploy`` object) and
``events`` (``deploy-*``). Heartbeats and events are not signed: they are only as trustworthy as the broker's
ACL, which lets a device publish under its own prefix only (docs/fleet.md). Anything oversized, not JSON, or
of the wrong shape is dropped and counted; nothing here raises into paho's callback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeguard.fleet.commands import check_answer

__all__ = ["AnswerSeen", "DeployStateSeen", "Observation", "parse_unverified_message", "DEPLOY_STATES"]

MAX_MESSAGE: Final = 256 * 1024
DEPLOY_STATES: Final = frozenset({"idle", "fetching", "probation", "committed", "rolled-back", "failed"})
_EVENT_STATES: Final = {
    "deploy-started": "fetching",
    "deploy-probation": "probation",
    "deploy-committed": "committed",
    "deploy-rolled-back": "rolled-back",
}


@dataclass(frozen=True)
class AnswerSeen:
    """A command answer whose signature verified with that device's key."""

    device: str
    nonce: str | None
    name: str | None
    ok: bool
    result: Mapping[str, Any]
    check: str | None
    reason: str | None


@dataclass(frozen=True)
class DeployStateSeen:
    """Where a device says its deploy is (heartbeat ``deploy`` object or a ``deploy-*`` event)."""

    device: str
    state: str
    rollout: str | None
    version: int | None
    reason: str | None
    probation_until: float | None
    source: str  # "heartbeat" | "event"


Observation = AnswerSeen | DeployStateSeen


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(v: Any, limit: int = 512) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def _deploy_state(device: str, d: Mapping[str, Any], source: str) -> DeployStateSeen | None:
    state = d.get("state")
    if state not in DEPLOY_STATES:
        return None
    version = d.get("version")
    return DeployStateSeen(
        device=device,
        state=str(state),
        rollout=_str(d.get("rollout"), 64),
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        reason=_str(d.get("reason")),
        probation_until=_num(d.get("probation_until")),
        source=source,
    )


def parse_unverified_message(
    base: str, topic: str, payload: bytes, *, pinned: Mapping[str, Ed25519PublicKey]
) -> Observation | None:
    """``base`` is ``<prefix>/`` of the fleet. None for anything that is not a usable observation (including
    answers that do not verify with the device's pinned key: a forged answer must not move a rollout)."""
    if not topic.startswith(base) or len(payload) > MAX_MESSAGE:
        return None
    device, _, kind = topic[len(base) :].partition("/")
    if not device or device in ("bundles", "rollouts"):
        return None
    if kind == "cmd/resp":
        ans = check_answer(device, payload, pinned=pinned, learned={})
        if not ans.trusted:
            return None
        doc = ans.doc
        result = doc.get("result")
        return AnswerSeen(
            device=device,
            nonce=_str(doc.get("nonce"), 64),
            name=_str(doc.get("name"), 64),
            ok=doc.get("ok") is True,
            result=result if isinstance(result, dict) else {},
            check=_str(doc.get("check"), 64),
            reason=_str(doc.get("reason")),
        )
    if kind not in ("heartbeat", "events"):
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    if kind == "heartbeat":
        d = doc.get("deploy")
        return _deploy_state(device, d, "heartbeat") if isinstance(d, dict) else None
    ev = doc.get("kind")
    if ev == "deploy-refused":
        check = _str(doc.get("check"), 64)
        return DeployStateSeen(
            device=device,
            state="failed",
            rollout=_str(doc.get("rollout"), 64),
            version=None,
            reason=f"refused: {check}" if check else "refused",
            probation_until=None,
            source="event",
        )
    if ev in _EVENT_STATES:
        return _deploy_state(device, {**doc, "state": _EVENT_STATES[str(ev)]}, "event")
    return None
