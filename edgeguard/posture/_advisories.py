"""Signed advisories: which versions of EdgeGuard's own dependencies are known to be vulnerable.

The publisher ships ``advisories.json`` beside the bundle (no network on the device). It is signed with
the publisher key, like bundles, and verified against the device's trust store (revocation included).
Format (docs/security.md, "Advisory file")::

    {"format": "edgeguard-advisories/1", "key_id": "<16 hex>",
     "payload": "<base64 of the payload JSON>", "signature": "<base64 Ed25519 signature>"}

    payload: {"created": "<ISO 8601>",
              "advisories": [{"id": "EGSA-2026-001", "package": "cryptography",
                              "affected": ["<46.0.5"], "severity": "high",
                              "summary": "...", "fix": "upgrade to >= 46.0.5"}]}

The signature covers ``b"EdgeGuard advisories v1\\0" + payload``: the prefix keeps an advisory signature
from ever being valid as a bundle signature and back. ``affected`` is a list of comparisons that must all
hold (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=`` against dotted numeric versions; pre-release tags are
ignored). Everything is checked in :func:`read_advisories`, the only parser of these bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from edgeguard._safeio import read_checked
from edgeguard.errors import BundleRejected, EdgeGuardError
from edgeguard.keys import PublisherKey, TrustStore

from ._findings import SEVERITIES, Severity

__all__ = ["Advisory", "AdvisoryError", "sign_advisories", "read_advisories", "affected", "FORMAT"]

FORMAT = "edgeguard-advisories/1"
_DOMAIN = b"EdgeGuard advisories v1\0"
MAX_ADVISORY_BYTES = 1024 * 1024
MAX_ADVISORIES = 2000
_CONSTRAINT = re.compile(r"(<=|>=|==|!=|<|>)\s*(\d+(?:\.\d+){0,3})\Z")
_OPS: Mapping[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


class AdvisoryError(EdgeGuardError):
    """The advisory file is unusable (unreadable, malformed, untrusted or badly signed): one line why."""


@dataclass(frozen=True)
class Advisory:
    id: str
    package: str
    affected: tuple[str, ...]
    severity: Severity
    summary: str
    fix: str


def _version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", text.split("+", 1)[0])[:4]]
    return tuple(parts + [0] * (4 - len(parts)))


def affected(installed: str, constraints: tuple[str, ...]) -> bool:
    """True when ``installed`` satisfies every constraint."""
    have = _version(installed)
    for c in constraints:
        m = _CONSTRAINT.fullmatch(c.strip())
        if m is None:  # validated on reading; here only for direct callers
            raise ValueError(f"bad version constraint {c!r}")
        if not _OPS[m.group(1)](have, _version(m.group(2))):
            return False
    return True


def sign_advisories(payload: Mapping[str, Any], key: PublisherKey) -> bytes:
    """The publisher side: the signed file for ``payload`` (validated the way a device will read it)."""
    body = json.dumps(payload, sort_keys=True).encode()
    _parse_payload(body)
    envelope = {
        "format": FORMAT,
        "key_id": key.key_id,
        "payload": base64.b64encode(body).decode(),
        "signature": base64.b64encode(key.private_key.sign(_DOMAIN + body)).decode(),
    }
    return json.dumps(envelope, indent=1).encode() + b"\n"


def read_advisories(path: Path, trust: TrustStore) -> tuple[Advisory, ...]:
    """Read, verify (trust store, then signature) and parse; ``AdvisoryError`` names what failed."""
    try:
        raw = read_checked(path, what="advisory file", limit=MAX_ADVISORY_BYTES, error=OSError).data
    except OSError as exc:
        raise AdvisoryError(f"{path}: {exc.strerror or exc}") from None
    try:
        env = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdvisoryError(f"{path}: not JSON") from None
    if not isinstance(env, dict) or env.get("format") != FORMAT:
        raise AdvisoryError(f"{path}: not an {FORMAT} file")
    key_id, payload, signature = env.get("key_id"), env.get("payload"), env.get("signature")
    if not (isinstance(key_id, str) and isinstance(payload, str) and isinstance(signature, str)):
        raise AdvisoryError(f"{path}: key_id, payload and signature must be strings")
    try:
        body = base64.b64decode(payload, validate=True)
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise AdvisoryError(f"{path}: payload or signature is not base64") from None
    try:
        trust.signer(key_id).verify(sig, _DOMAIN + body)
    except BundleRejected as exc:  # revoked or untrusted signer
        raise AdvisoryError(f"{path}: {exc.check}: key {key_id[:16]!r}") from None
    except InvalidSignature:
        raise AdvisoryError(f"{path}: signature by {key_id} does not verify") from None
    try:
        return _parse_payload(body)
    except AdvisoryError as exc:
        raise AdvisoryError(f"{path}: {exc}") from None


def _text(d: Mapping[str, Any], key: str, limit: int) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= limit:
        raise AdvisoryError(f"advisory {key} must be a string of 1..{limit} characters")
    return v


def _parse_payload(body: bytes) -> tuple[Advisory, ...]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise AdvisoryError("payload is not JSON") from None
    items = doc.get("advisories") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) > MAX_ADVISORIES:
        raise AdvisoryError(f"payload needs an 'advisories' list of at most {MAX_ADVISORIES}")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise AdvisoryError("each advisory is an object")
        constraints = item.get("affected")
        if (
            not isinstance(constraints, list)
            or not 1 <= len(constraints) <= 8
            or not all(isinstance(c, str) and _CONSTRAINT.fullmatch(c.strip()) for c in constraints)
        ):
            raise AdvisoryError("affected must list 1..8 comparisons like '<46.0.5'")
        severity = item.get("severity")
        if severity not in SEVERITIES:
            raise AdvisoryError(f"severity must be one of {', '.join(SEVERITIES)}")
        out.append(
            Advisory(
                id=_text(item, "id", 64),
                package=_text(item, "package", 128).lower(),
                affected=tuple(c.strip() for c in constraints),
                severity=severity,
                summary=_text(item, "summary", 1024),
                fix=_text(item, "fix", 1024),
            )
        )
    return tuple(out)
