"""One audit record: its canonical bytes, its hash, and what of an event's data it may keep.

A record is one line of canonical JSON (keys sorted, no spaces, ASCII only)::

    {"data":{...},"hash":"<hex>","kind":"bundle-rejected","prev":"<hex>","seq":7,"time":"2026-...Z"}

``hash`` is SHA-256 over the canonical JSON of the record without ``hash``; ``prev`` is the previous record's
``hash`` (:data:`GENESIS` for the first record ever). The line must be exactly the canonical form: a byte
changed anywhere, even one that still parses (a space, ``1.0`` for ``1``), is a different line and is refused,
so a verifier never has to decide whether two spellings mean the same record.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from edgeguard._echo import cut

__all__ = ["GENESIS", "Record", "canonical", "record_hash", "scrub", "MAX_DATA_BYTES", "MAX_LINE_BYTES"]

GENESIS = "0" * 64
MAX_DATA_BYTES = 4096  # of one record's data (canonical JSON); larger data is cut to a summary
MAX_LINE_BYTES = 8192  # a line longer than this is not a record (the verifier reads no more of it)
_SECRET_WORDS = ("token", "secret", "password", "authorization", "private", "passphrase")
_MAX_DEPTH = 4
_MAX_ITEMS = 64


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(seq: int, time: str, kind: str, data: dict[str, Any], prev: str) -> str:
    body = {"seq": seq, "time": time, "kind": kind, "data": data, "prev": prev}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass(frozen=True)
class Record:
    seq: int
    time: str
    kind: str
    data: dict[str, Any]
    prev: str
    hash: str

    @classmethod
    def make(cls, *, seq: int, time: str, kind: str, data: dict[str, Any], prev: str) -> Record:
        return cls(seq, time, kind, data, prev, record_hash(seq, time, kind, data, prev))

    def line(self) -> bytes:
        doc = {"seq": self.seq, "time": self.time, "kind": self.kind, "data": self.data, "prev": self.prev,
               "hash": self.hash}
        return canonical(doc) + b"\n"

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "data": self.data, "prev": self.prev,
                "hash": self.hash}


def scrub(data: dict[str, Any]) -> dict[str, Any]:
    """What of an event's ``data`` goes into the log: JSON values only, strings cut, no field whose name says
    it holds a secret (its value becomes ``"[redacted]"``), at most :data:`MAX_DATA_BYTES` in all.

    Events already carry no secrets by design; this is the second line, because the log outlives the event
    and is read by people who were never meant to hold a token."""
    clean = _scrub(data, 0)
    assert isinstance(clean, dict)
    if len(canonical(clean)) > MAX_DATA_BYTES:
        return {"cut": True, "summary": cut(canonical(clean).decode("ascii"), MAX_DATA_BYTES // 2)}
    return clean


def _scrub(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value)
    if depth >= _MAX_DEPTH:
        return cut(value, 200)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= _MAX_ITEMS:
                out["..."] = f"{len(value) - _MAX_ITEMS} more fields cut"
                break
            key = cut(k, 80)
            if any(w in key.lower() for w in _SECRET_WORDS) and not key.lower().endswith(("_id", "_name")):
                out[key] = "[redacted]"
            else:
                out[key] = _scrub(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        items = [_scrub(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"{len(value) - _MAX_ITEMS} more items cut")
        return items
    return cut(value)
