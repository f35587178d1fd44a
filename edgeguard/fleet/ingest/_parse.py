"""The one gatekeeper for what devices publish: topic + payload bytes -> a typed row, or a one-line reason.

Checks, in order, each before what depends on it:

1. topic: exactly ``edgeguard/v1/<fleet>/<device>/<kind>`` with our fleet, a device name in the device's
   own charset, and kind one of results / heartbeat / status / events;
2. size: at most ``max_payload_bytes`` (before any parsing);
3. no ``\\u0000`` escape (PostgreSQL's jsonb and text refuse NUL: one such row would fail its whole batch);
4. JSON object, no NaN/Infinity (jsonb refuses them), bounded nesting (RecursionError is a rejection);
5. per kind: a result needs ``id == "<device>:<seq>"`` with the topic's device (a device cannot claim another
   device's ids and so pre-empt its rows), integer ``seq``, ``kind`` string, boolean ``priority``, finite
   ``created`` between 2000 and 2200, and ``data``; heartbeat / status / events take their ``time`` when it is
   a plausible float, else the time received (the broker's LWT carries none).

The key of a result is the device's result id; heartbeats, status and events carry no id, so theirs is a
digest of topic and payload (a redelivered copy is byte-identical).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from edgeguard.fleet.ingest._config import TOPIC_SEGMENT

__all__ = ["ResultRow", "MessageRow", "Rejected", "parse_message", "KINDS"]

KINDS = ("results", "heartbeat", "status", "events")
_EARLIEST = 946684800.0  # 2000-01-01: a device clock before this is unset (no RTC), not a time
_LATEST = 7258118400.0  # 2200-01-01


class Rejected(Exception):
    """A message that can never be stored; ``str()`` is the one-line reason (no payload content)."""


@dataclass(frozen=True, slots=True)
class ResultRow:
    result_id: str
    fleet: str
    device: str
    seq: int
    kind: str
    priority: bool
    created: float
    received: float
    data: str  # JSON text


@dataclass(frozen=True, slots=True)
class MessageRow:
    table: str  # heartbeats | device_status | events
    msg_id: str
    fleet: str
    device: str
    time: float
    received: float
    body: str  # JSON text


_TABLE = {"heartbeat": "heartbeats", "status": "device_status", "events": "events"}


def _no_constants(name: str) -> Any:
    raise Rejected(f"JSON constant {name} not allowed")


def _split_topic(topic: str, fleet: str) -> tuple[str, str]:
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "edgeguard" or parts[1] != "v1" or parts[2] != fleet:
        raise Rejected("topic outside edgeguard/v1/<fleet>/<device>/<kind>")
    if not TOPIC_SEGMENT.fullmatch(parts[3]):
        raise Rejected("bad device name in topic")
    if parts[4] not in KINDS:
        raise Rejected(f"unknown topic kind {parts[4][:32]!r}")
    return parts[3], parts[4]


def _parse_unverified_json(payload: bytes) -> dict[str, Any]:
    if b"\\u0000" in payload:
        raise Rejected("payload contains \\u0000 (not storable in PostgreSQL)")
    try:
        doc = json.loads(payload, parse_constant=_no_constants)
    except Rejected:
        raise
    except RecursionError:
        raise Rejected("payload nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"payload is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise Rejected("payload is not a JSON object")
    return doc


def _dump(value: Any) -> str:
    """Compact JSON text for a jsonb column; a lone UTF-16 surrogate (which jsonb refuses) is a rejection."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("payload contains an unpaired UTF-16 surrogate") from None
    return text


def _plausible_time(value: Any) -> float | None:
    """``value`` as epoch seconds when it is a number between 2000 and 2200, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
        if _EARLIEST <= seconds <= _LATEST:
            return seconds
    return None


def parse_message(
    topic: str, payload: bytes, *, fleet: str, received: float, max_payload_bytes: int
) -> ResultRow | MessageRow:
    """The row for one message; raises Rejected with the reason when it can never be stored."""
    device, kind = _split_topic(topic, fleet)
    if len(payload) > max_payload_bytes:
        raise Rejected(f"payload of {len(payload)} bytes exceeds {max_payload_bytes}")
    doc = _parse_unverified_json(payload)
    if kind == "results":
        return _result_row(doc, fleet, device, received)
    when = doc.get("time")
    body = _dump(doc)
    digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]
    return MessageRow(
        table=_TABLE[kind],
        msg_id=digest,
        fleet=fleet,
        device=device,
        time=_plausible_time(when) or received,
        received=received,
        body=body,
    )


def _result_row(doc: dict[str, Any], fleet: str, device: str, received: float) -> ResultRow:
    rid, seq, kind, created = doc.get("id"), doc.get("seq"), doc.get("kind"), doc.get("created")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise Rejected("result seq missing or not a non-negative 64-bit integer")
    if rid != f"{device}:{seq}":
        raise Rejected("result id is not <device>:<seq> of the publishing device")
    if not isinstance(kind, str) or not kind.isidentifier() or len(kind) > 64:  # the outbox's own rule
        raise Rejected("result kind missing or not an identifier of at most 64 characters")
    priority = doc.get("priority", False)
    if not isinstance(priority, bool):
        raise Rejected("result priority is not a boolean")
    created_s = _plausible_time(created)
    if created_s is None:
        raise Rejected("result created missing or not a time between 2000 and 2200")
    if "data" not in doc:
        raise Rejected("result has no data")
    data = _dump(doc["data"])
    return ResultRow(
        result_id=rid,
        fleet=fleet,
        device=device,
        seq=seq,
        kind=kind,
        priority=priority,
        created=created_s,
        received=received,
        data=data,
    )
