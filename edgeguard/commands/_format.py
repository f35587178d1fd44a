"""The wire format of remote commands and their answers (docs/commands.md, "Format").

Both travel in the same envelope, one JSON object with exactly these keys::

    {"v": 1, "key_id": "<16 hex>", "payload": "<base64 of canonical JSON>", "sig": "<base64 Ed25519>"}

The signature covers a domain label and the payload bytes exactly as sent (``_COMMAND_LABEL + payload``), so
the device authenticates the bytes before it interprets them, and a command's signature can never pass for an
answer's (or a bundle's). The payload is canonical JSON (sorted keys, no spaces, ASCII, integers only), so the
same command always has the same bytes and a re-encoding on the device must reproduce them.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.keys import public_key_id

__all__ = [
    "FORMAT_VERSION",
    "COMMAND_LABEL",
    "ANSWER_LABEL",
    "canonical",
    "envelope",
    "new_nonce",
]

FORMAT_VERSION: Final = 1
# Domain separation (one signing key never signs two kinds of thing that could be confused).
COMMAND_LABEL: Final = b"edgeguard/v1 command\n"
ANSWER_LABEL: Final = b"edgeguard/v1 command answer\n"


def canonical(doc: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only. Floats are refused by the command schema, so
    every number has exactly one spelling."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def envelope(payload: Mapping[str, Any], key: Ed25519PrivateKey, label: bytes) -> bytes:
    """Sign ``payload`` (canonical JSON) under ``label`` and wrap it in the envelope."""
    body = canonical(payload)
    sig = key.sign(label + body)
    doc = {
        "v": FORMAT_VERSION,
        "key_id": public_key_id(key.public_key()),
        "payload": base64.b64encode(body).decode(),
        "sig": base64.b64encode(sig).decode(),
    }
    return canonical(doc)


def new_nonce() -> str:
    """128 random bits as 32 hex digits: unique per command across the fleet's lifetime."""
    return secrets.token_hex(16)
