"""Operator side of the command format: sign a command, check a device's answer (docs/commands.md).

An answer is *verified* only with a key for that device: one given by the operator (pinned, e.g. from the
device's provisioning) or, failing that, the one its retained birth status announced (learned: only as
trustworthy as the broker's ACL on that device's ``status`` topic; trust on first use without one).
Anything that does not verify with the device's key, names another device, or is signed by another key is
*forged*.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeguard.commands import (
    ANSWER_LABEL,
    COMMAND_LABEL,
    FORMAT_VERSION,
    MAX_VALIDITY_S,
    envelope,
    new_nonce,
)
from edgeguard.keys import public_key_id

__all__ = [
    "SignedCommand",
    "Answer",
    "Verdict",
    "sign_command",
    "check_answer",
    "parse_target",
    "learned_key",
]

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
Verdict = Literal["verified", "verified (learned key)", "forged", "no key"]


@dataclass(frozen=True)
class SignedCommand:
    nonce: str
    name: str
    target: tuple[str, str]
    data: bytes  # the envelope, as published on each device's cmd topic


@dataclass(frozen=True)
class Answer:
    device: str  # from the topic it came on
    verdict: Verdict
    why: str  # for forged / no key: what did not check out
    doc: Mapping[str, Any]  # the answer's payload (unverified unless verdict starts with "verified")

    @property
    def trusted(self) -> bool:
        return self.verdict.startswith("verified")

    @property
    def ok(self) -> bool:
        return self.trusted and self.doc.get("ok") is True


def parse_target(text: str, fleet: str) -> tuple[str, str]:
    """``ID`` | ``group:G`` | ``all`` -> the signed target (kind, value); ValueError for a name a device
    would refuse anyway (1..64 of ``[A-Za-z0-9_.-]``)."""
    if text == "all":
        kind, value = "fleet", fleet
    elif text.startswith("group:"):
        kind, value = "group", text.removeprefix("group:")
    else:
        kind, value = "device", text
    if not _NAME.fullmatch(value):
        raise ValueError(f"target {text[:80]!r}: ID, group:NAME or all, names of 1..64 of [A-Za-z0-9_.-]")
    return kind, value


def sign_command(
    key: Ed25519PrivateKey,
    *,
    fleet: str,
    target: tuple[str, str],
    name: str,
    args: Mapping[str, str],
    now: int,
    ttl_s: int = 300,
    nonce: str | None = None,
) -> SignedCommand:
    if not 1 <= ttl_s <= MAX_VALIDITY_S:
        raise ValueError(f"ttl must be 1..{MAX_VALIDITY_S} s")
    nonce = nonce or new_nonce()
    payload = {
        "v": FORMAT_VERSION,
        "fleet": fleet,
        "target": {target[0]: target[1]},
        "name": name,
        "args": dict(args),
        "issued_at": now,
        "expires_at": now + ttl_s,
        "nonce": nonce,
        "key_id": public_key_id(key.public_key()),
    }
    return SignedCommand(nonce=nonce, name=name, target=target, data=envelope(payload, key, COMMAND_LABEL))


def learned_key(status: Mapping[str, Any]) -> Ed25519PublicKey | None:
    """The answer key a retained birth status announces, or None."""
    info = status.get("signing_key")
    if not isinstance(info, dict) or not isinstance(info.get("ed25519"), str):
        return None
    try:
        raw = base64.b64decode(info["ed25519"], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        return None


def _unverified_doc(data: bytes) -> tuple[dict[str, Any], str, bytes, bytes] | None:
    try:
        env = json.loads(data)
        payload = base64.b64decode(env["payload"], validate=True)
        sig = base64.b64decode(env["sig"], validate=True)
        doc = json.loads(payload)
        key_id = env["key_id"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if not isinstance(doc, dict) or not isinstance(key_id, str):
        return None
    return doc, key_id, payload, sig


def check_answer(
    device: str,
    data: bytes,
    *,
    pinned: Mapping[str, Ed25519PublicKey],
    learned: Mapping[str, Ed25519PublicKey],
) -> Answer:
    """Verify an answer that arrived on ``<prefix>/<device>/cmd/resp``."""
    parsed = _unverified_doc(data)
    if parsed is None:
        return Answer(device, "forged", "not an answer envelope", {})
    doc, key_id, payload, sig = parsed
    verdict: Verdict = "verified"
    key = pinned.get(device)
    if key is None:
        key, verdict = learned.get(device), "verified (learned key)"
    if key is None:
        return Answer(device, "no key", f"no signing key known for {device}", doc)
    if key_id != public_key_id(key):
        return Answer(device, "forged", f"signed by key {key_id[:16]}, not {device}'s", doc)
    try:
        key.verify(sig, ANSWER_LABEL + payload)
    except InvalidSignature:
        return Answer(device, "forged", f"signature does not verify with {device}'s key", doc)
    if doc.get("device") != device:
        return Answer(device, "forged", f"a genuine answer of another device ({doc.get('device')!r})", doc)
    return Answer(device, verdict, "", doc)
