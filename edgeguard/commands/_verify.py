"""The ONLY code that reads command bytes on the device: untrusted bytes in, a verified :class:`Command` out.

Checks run in a fixed order, each before anything that depends on it (docs/commands.md, "Verification"):

1. size: the message is at most ``max_bytes`` (before any parsing);
2. envelope: one JSON object with exactly ``v`` (1), ``key_id`` (16 hex), ``payload`` and ``sig`` (base64;
   a 64-byte signature);
3. signer: ``key_id`` is not revoked and is a trusted operator key;
4. signature: Ed25519 over ``COMMAND_LABEL + payload`` (the payload bytes exactly as sent);
5. payload: strict schema (exactly the documented keys, integers for times, string arguments), canonical
   encoding, and its ``key_id`` equal to the envelope's;
6. fleet, then target: the command's fleet is this device's, and its target names this device, one of its
   ``device.groups``, or the fleet;
7. time: not past ``expires_at`` and not issued after now, each with ``max_clock_skew_s`` of tolerance; the
   validity is at most ``MAX_VALIDITY_S`` (a nonce must be kept that long);
8. replay: the nonce is recorded durably (NonceStore) and refused if seen before.

Only a Command that passed all of them is handed to the code that acts. Every failure is
``CommandRefused(check, detail)``. Functions reading data not yet authenticated are named
``_parse_unverified_*`` and are written to be safe on arbitrary bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidSignature

from edgeguard._echo import echo
from edgeguard.errors import BundleRejected, CommandRefused
from edgeguard.keys import TrustStore

from ._format import COMMAND_LABEL, FORMAT_VERSION, canonical
from ._nonces import NonceStore

__all__ = ["Command", "CommandGate", "MAX_VALIDITY_S", "MAX_ARGS", "parse_unverified_nonce"]

MAX_VALIDITY_S: Final = 86_400  # expires_at - issued_at; the nonce is kept this long (plus the skew)
MAX_ARGS: Final = 32
_HEX16 = re.compile(r"[0-9a-f]{16}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ARG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_ARG_VALUE = 1024
_ENVELOPE_KEYS = frozenset({"v", "key_id", "payload", "sig"})
_PAYLOAD_KEYS = frozenset(
    {"v", "fleet", "target", "name", "args", "issued_at", "expires_at", "nonce", "key_id"}
)
_TARGET_KINDS = ("device", "group", "fleet")


@dataclass(frozen=True, kw_only=True)
class Command:
    """A command that passed every check: signed by a trusted operator key, for this device, fresh, new."""

    name: str
    args: Mapping[str, str]
    nonce: str
    key_id: str
    fleet: str
    target: tuple[str, str]  # (kind, value): ("device", id) | ("group", name) | ("fleet", fleet)
    issued_at: int
    expires_at: int


def _refuse(check: Any, detail: str) -> NoReturn:
    raise CommandRefused(check, detail)


def _no_float(text: str) -> NoReturn:
    _refuse("malformed", f"non-integer number {echo(text)}")


def _no_constant(text: str) -> NoReturn:
    _refuse("malformed", f"invalid number {echo(text)}")


def _strict_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data, parse_float=_no_float, parse_constant=_no_constant)
    except CommandRefused:
        raise
    except (ValueError, RecursionError) as exc:
        _refuse("malformed", f"{what} is not JSON: {exc}")


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        _refuse("malformed", f"envelope {what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _refuse("malformed", f"envelope {what} is not base64")
    # Canonical base64 only: "QQ==" and "QR==" decode alike, and one message must have one spelling.
    if base64.b64encode(raw).decode() != value:
        _refuse("malformed", f"envelope {what} is not canonical base64")
    return raw


def _parse_unverified_envelope(data: bytes) -> tuple[str, bytes, bytes]:
    doc = _strict_json(data, "command")
    if not isinstance(doc, dict) or set(doc) != _ENVELOPE_KEYS:
        keys = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
        _refuse("malformed", f"envelope must have exactly v, key_id, payload, sig; got {echo(keys)}")
    if doc["v"] != FORMAT_VERSION or isinstance(doc["v"], bool):
        _refuse("malformed", f"envelope version {echo(doc['v'])} (this device reads v{FORMAT_VERSION})")
    key_id = doc["key_id"]
    if not isinstance(key_id, str) or not _HEX16.fullmatch(key_id):
        _refuse("malformed", f"envelope key_id {echo(key_id)} is not 16 hex digits")
    payload = _b64(doc["payload"], "payload")
    sig = _b64(doc["sig"], "sig")
    if len(sig) != 64:
        _refuse("malformed", f"signature of {len(sig)} bytes (Ed25519: 64)")
    return key_id, payload, sig


def parse_unverified_nonce(data: bytes, max_bytes: int) -> str | None:
    """The nonce a refused command claims, to name it in the answer; None when it cannot be read. Never
    trusted for anything else (an attacker chooses it), and only a 32-hex-digit value is ever echoed."""
    if len(data) > max_bytes:
        return None
    try:
        _, payload, _ = _parse_unverified_envelope(data)
        doc = json.loads(payload)
    except (CommandRefused, ValueError, RecursionError):
        return None
    nonce = doc.get("nonce") if isinstance(doc, dict) else None
    return nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None


def _int(doc: Mapping[str, Any], key: str) -> int:
    v = doc[key]
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 40:
        _refuse("malformed", f"{key} must be whole seconds since the epoch, got {echo(v)}")
    return v


def _parse_payload(payload: bytes, envelope_key_id: str) -> Command:
    """The signed payload (authenticated already: a malformed one is an operator tool's bug, no attack)."""
    doc = _strict_json(payload, "payload")
    if not isinstance(doc, dict) or set(doc) != _PAYLOAD_KEYS:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        _refuse("malformed", f"payload keys must be {sorted(_PAYLOAD_KEYS)}; got {echo(got, 200)}")
    if canonical(doc) != payload:
        _refuse("malformed", "payload is not canonical JSON (sorted keys, no spaces, ASCII)")
    if doc["v"] != FORMAT_VERSION or isinstance(doc["v"], bool):
        _refuse("malformed", f"payload version {echo(doc['v'])}")
    if doc["key_id"] != envelope_key_id:
        _refuse("malformed", "payload key_id differs from the envelope's")
    for key, pattern in (("fleet", _ID), ("name", _NAME), ("nonce", _NONCE)):
        if not isinstance(doc[key], str) or not pattern.fullmatch(doc[key]):
            _refuse("malformed", f"{key} {echo(doc[key])} does not match {pattern.pattern}")
    target = doc["target"]
    if not isinstance(target, dict) or len(target) != 1:
        _refuse("malformed", "target must be one of {device: ID}, {group: NAME}, {fleet: FLEET}")
    ((kind, value),) = target.items()
    if kind not in _TARGET_KINDS or not isinstance(value, str) or not _ID.fullmatch(value):
        _refuse("malformed", f"target {echo(target)}: one of {{device|group|fleet: NAME}}")
    args = doc["args"]
    if not isinstance(args, dict) or len(args) > MAX_ARGS:
        _refuse("malformed", f"args must be an object of at most {MAX_ARGS} string values")
    for k, v in args.items():
        if not _ARG_KEY.fullmatch(k) or not isinstance(v, str) or len(v) > _MAX_ARG_VALUE:
            _refuse("malformed", f"argument {echo(k)}: names of [A-Za-z0-9_.-], string values")
    return Command(
        name=doc["name"],
        args=dict(args),
        nonce=doc["nonce"],
        key_id=envelope_key_id,
        fleet=doc["fleet"],
        target=(kind, value),
        issued_at=_int(doc, "issued_at"),
        expires_at=_int(doc, "expires_at"),
    )


@dataclass(kw_only=True)
class CommandGate:
    """Verifies commands for one device; ``operators`` is replaced on reload (:meth:`replace_operators`)."""

    operators: TrustStore
    nonces: NonceStore
    fleet: str
    device_id: str
    groups: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 65536
    max_clock_skew_s: float = 300.0

    def replace_operators(self, operators: TrustStore) -> None:
        self.operators = operators  # one reference assignment: a check in progress keeps the old store

    def check(self, data: bytes, *, now: float) -> Command:
        """Run every check in order (module docstring) on ``data`` at wall-clock time ``now``."""
        # 1. size, before anything is parsed
        if len(data) > self.max_bytes:
            _refuse("too large", f"command of {len(data)} bytes exceeds the limit of {self.max_bytes}")
        # 2. envelope
        key_id, payload, sig = _parse_unverified_envelope(data)
        # 3. signer (revocation wins over trust, as for publisher keys)
        operators = self.operators
        try:
            key = operators.signer(key_id)
        except BundleRejected as exc:
            check = "revoked" if exc.check == "revoked" else "untrusted signer"
            why = "has been revoked" if check == "revoked" else "is not a trusted operator key"
            _refuse(check, f"operator key {key_id} {why}")
        # 4. signature over the payload bytes as sent
        try:
            key.verify(sig, COMMAND_LABEL + payload)
        except InvalidSignature:
            _refuse("signature", f"signature does not verify with operator key {key_id}")
        # 5. payload
        cmd = _parse_payload(payload, key_id)
        # 6. fleet, then target
        if cmd.fleet != self.fleet:
            _refuse("fleet", f"command for fleet {cmd.fleet!r}; this device is in fleet {self.fleet!r}")
        kind, value = cmd.target
        if kind == "device" and value != self.device_id:
            _refuse("target", f"command for device {value!r}; this is {self.device_id!r}")
        if kind == "group" and value not in self.groups:
            _refuse("target", f"command for group {value!r}; this device is not in it")
        if kind == "fleet" and value != self.fleet:
            _refuse("target", f"command for fleet {value!r}; this device is in fleet {self.fleet!r}")
        # 7. time
        if not cmd.issued_at < cmd.expires_at <= cmd.issued_at + MAX_VALIDITY_S:
            _refuse("malformed", f"expires_at must be 1..{MAX_VALIDITY_S} s after issued_at")
        skew = self.max_clock_skew_s
        if now > cmd.expires_at + skew:
            _refuse("expired", f"command expired at {cmd.expires_at} (device time {now:.0f})")
        if cmd.issued_at > now + skew:
            _refuse("not yet valid", f"command issued at {cmd.issued_at}, after device time {now:.0f}")
        # 8. replay: recorded durably before anything acts on it
        self.nonces.record(cmd.nonce, keep_until=cmd.expires_at + skew, now=now)
        return cmd
