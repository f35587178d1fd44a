"""Provisioning archives: the ONLY code that reads one (device side), and the one that writes them.

An archive carries everything one device needs (config, keys or only their public halves, certificates,
API tokens), signed by the fleet's publisher key. Format (UTF-8 JSON, at most ``MAX_ARCHIVE_BYTES``)::

    {"format": "edgeguard-provisioning/1",
     "signer": "<PEM SubjectPublicKeyInfo: the fleet publisher key, Ed25519>",
     "body": "<base64: the body JSON>",
     "signature": "<base64: Ed25519 over DOMAIN || body bytes>"}

    body = {"fleet": F, "device": ID, "issued": ISO8601, "cert_serial": HEX,
            "files": {NAME: {"mode": 384 | 420, "data": base64}}}                  # plain (mode 0600 file)
        or {..., "sealed": {"to": KEYID, "data": base64(HPKE(files JSON))}}         # sealed to device.pub

Checks in :func:`open_archive`, each before what depends on it:

1. size (before reading more than the limit), then the envelope: a JSON object with exactly these keys and
   the known format;
2. signer: the embedded key's id equals the key id the device pins (``--fleet-key-id``, the fleet key the
   device already has, or the one ``edgeguard enroll`` recorded); an archive signed by anyone else is refused
   even when its signature is fine: a signature under a key the archive brings itself proves nothing;
3. signature over DOMAIN || body (the body is authenticated before a byte of it is interpreted);
4. body: fleet and device ids, the device this archive is for (when the caller knows it), names from a fixed
   allowlist (no paths: nothing can land outside the install directory), modes, sizes;
5. sealed body: the device key's id is the recipient, then HPKE (RFC 9180, X25519/HKDF-SHA256/AES-256-GCM,
   info bound to fleet and device) opens the files, which pass step 4's checks.

Every failure is ``ArchiveRejected(check, detail)``. Helpers that touch unauthenticated bytes are named
``_parse_unverified_*``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edgeguard._echo import echo
from edgeguard._safeio import read_checked
from edgeguard.errors import ArchiveCheck, ArchiveRejected
from edgeguard.keys import DeviceKey, PublisherKey, public_key_id

__all__ = [
    "ARCHIVE_FORMAT",
    "MAX_ARCHIVE_BYTES",
    "PRIVATE_FILES",
    "PUBLIC_FILES",
    "OpenedArchive",
    "build_archive",
    "open_archive",
    "read_archive_file",
]

ARCHIVE_FORMAT = "edgeguard-provisioning/1"
MAX_ARCHIVE_BYTES = 1024 * 1024
_MAX_FILE_BYTES = 256 * 1024
_DOMAIN = b"edgeguard/v1 provisioning archive\x00"
_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")
_ENVELOPE_KEYS = frozenset({"format", "signer", "body", "signature"})

# The only names an archive may hold, installed flat into /etc/edgeguard: secrets (0600) and public files.
PRIVATE_FILES = frozenset({"edgeguard.toml", "api-tokens", "device.key", "device-sign.key", "client.key"})
PUBLIC_FILES = frozenset(
    {
        "device.pub",
        "device-sign.pub",
        "client.pem",
        "site.pem",
        "fleet-ca.pem",
        "publisher.pub",
        "operator.pub",
    }
)
_MODES = {0o600, 0o644}


@dataclass(frozen=True)
class OpenedArchive:
    """A verified archive: who it is for, who signed it, and its files (name -> (mode, bytes))."""

    fleet: str
    device: str
    issued: str
    cert_serial: str
    signer_key_id: str
    sealed: bool
    files: Mapping[str, tuple[int, bytes]]


def _reject(check: ArchiveCheck, detail: str) -> NoReturn:
    raise ArchiveRejected(check, detail)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        _reject("malformed", f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _reject("malformed", f"{what} is not valid base64")


def _sealing_info(fleet: str, device: str) -> bytes:
    # Binds the sealed files to this fleet and device: a sealed body cannot be moved into another's archive.
    return _DOMAIN + fleet.encode() + b"\x00" + device.encode()


def _encode_files(files: Mapping[str, tuple[int, bytes]]) -> dict[str, Any]:
    return {
        name: {"mode": mode, "data": base64.b64encode(data).decode()}
        for name, (mode, data) in sorted(files.items())
    }


def build_archive(
    *,
    fleet: str,
    device: str,
    cert_serial: str,
    files: Mapping[str, tuple[int, bytes]],
    sign_key: PublisherKey,
    seal_to: X25519PublicKey | None = None,
    now: datetime | None = None,
) -> bytes:
    """The archive bytes (publisher side). ``seal_to``: encrypt the files to this device key (HPKE)."""
    for name, (mode, data) in files.items():
        if name not in PRIVATE_FILES | PUBLIC_FILES or mode not in _MODES or len(data) > _MAX_FILE_BYTES:
            raise ValueError(f"archive file {name!r} (mode {mode:o}, {len(data)} bytes) is not allowed")
    body: dict[str, Any] = {
        "fleet": fleet,
        "device": device,
        "issued": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "cert_serial": cert_serial,
    }
    encoded = _encode_files(files)
    if seal_to is None:
        body["files"] = encoded
    else:
        plain = json.dumps(encoded, sort_keys=True).encode()
        sealed = _HPKE.encrypt(plain, seal_to, info=_sealing_info(fleet, device))
        body["sealed"] = {"to": public_key_id(seal_to), "data": base64.b64encode(sealed).decode()}
    body_bytes = json.dumps(body, sort_keys=True).encode()
    signature = sign_key.private_key.sign(_DOMAIN + body_bytes)
    signer = sign_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    envelope = {
        "format": ARCHIVE_FORMAT,
        "signer": signer.decode(),
        "body": base64.b64encode(body_bytes).decode(),
        "signature": base64.b64encode(signature).decode(),
    }
    data = json.dumps(envelope, indent=1).encode() + b"\n"
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ValueError(f"archive of {len(data)} bytes exceeds {MAX_ARCHIVE_BYTES}")
    return data


def read_archive_file(path: Path) -> bytes:
    """The archive's bytes: one checked open (no link, regular file), at most the limit."""

    def too_large_or_unreadable(line: str) -> Exception:
        if "larger than the limit" in line:
            return ArchiveRejected("too large", line)
        return OSError(line)

    return read_checked(path, what="archive", limit=MAX_ARCHIVE_BYTES, error=too_large_or_unreadable).data


def _parse_unverified_envelope(data: bytes) -> tuple[Ed25519PublicKey, bytes, bytes]:
    if len(data) > MAX_ARCHIVE_BYTES:
        _reject("too large", f"{len(data)} bytes (limit {MAX_ARCHIVE_BYTES})")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        _reject("malformed", "not a JSON document")
    if not isinstance(doc, dict) or set(doc) != _ENVELOPE_KEYS:
        _reject("malformed", f"expected an object with keys {', '.join(sorted(_ENVELOPE_KEYS))}")
    if doc["format"] != ARCHIVE_FORMAT:
        _reject("malformed", f"unknown format {echo(doc['format'])} (expected {ARCHIVE_FORMAT})")
    if not isinstance(doc["signer"], str) or len(doc["signer"]) > 1024:
        _reject("malformed", "signer is not a PEM public key")
    try:
        signer = serialization.load_pem_public_key(doc["signer"].encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        _reject("malformed", "signer is not a PEM public key")
    if not isinstance(signer, Ed25519PublicKey):
        _reject("malformed", "signer is not an Ed25519 key")
    return signer, _b64(doc["body"], "body"), _b64(doc["signature"], "signature")


def _checked_files(raw: Any) -> dict[str, tuple[int, bytes]]:
    if not isinstance(raw, dict) or not raw:
        _reject("malformed", "files must be a non-empty object")
    files: dict[str, tuple[int, bytes]] = {}
    for name, entry in raw.items():
        if name not in PRIVATE_FILES | PUBLIC_FILES:
            _reject("malformed", f"file name {echo(name)} is not one an archive may hold")
        if not isinstance(entry, dict) or set(entry) != {"mode", "data"}:
            _reject("malformed", f"file {name}: expected mode and data")
        mode = entry["mode"]
        if type(mode) is not int or mode not in _MODES or (name in PRIVATE_FILES and mode != 0o600):
            _reject("malformed", f"file {name}: mode {echo(mode)} not allowed")
        content = _b64(entry["data"], f"file {name}")
        if len(content) > _MAX_FILE_BYTES:
            _reject("too large", f"file {name} holds {len(content)} bytes (limit {_MAX_FILE_BYTES})")
        files[name] = (mode, content)
    return files


def open_archive(
    data: bytes,
    *,
    fleet_key_id: str,
    device: str | None = None,
    device_key: DeviceKey | None = None,
) -> OpenedArchive:
    """Verify ``data`` (checks in the module docstring) against the pinned ``fleet_key_id``. ``device``: the
    device this archive must be for (None: any). ``device_key``: opens a sealed archive."""
    signer, body_bytes, signature = _parse_unverified_envelope(data)
    signer_id = public_key_id(signer)
    if signer_id != fleet_key_id.lower():
        _reject("untrusted signer", f"signed by key {signer_id}, the device trusts fleet key {fleet_key_id}")
    try:
        signer.verify(signature, _DOMAIN + body_bytes)
    except InvalidSignature:
        _reject("signature", "the fleet's signature does not match the archive's content (tampered?)")
    # Authenticated from here on: the body is the fleet's own, so a schema failure is the fleet's bug.
    try:
        body = json.loads(body_bytes)
    except ValueError:
        _reject("malformed", "body is not JSON")
    if not isinstance(body, dict):
        _reject("malformed", "body is not an object")
    fleet, dev, issued, serial = (body.get(k) for k in ("fleet", "device", "issued", "cert_serial"))
    if not (isinstance(fleet, str) and _ID.fullmatch(fleet) and isinstance(dev, str) and _ID.fullmatch(dev)):
        _reject("malformed", "fleet or device id missing or invalid")
    if not isinstance(issued, str) or not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
        _reject("malformed", "issued or cert_serial missing or invalid")
    if device is not None and dev != device:
        _reject("wrong device", f"archive is for device {dev}, this device is {device}")
    if ("files" in body) == ("sealed" in body):
        _reject("malformed", "body must hold exactly one of files or sealed")
    if "files" in body:
        return OpenedArchive(fleet, dev, issued, serial, signer_id, False, _checked_files(body["files"]))
    sealed = body["sealed"]
    if not isinstance(sealed, dict) or set(sealed) != {"to", "data"}:
        _reject("malformed", "sealed must hold to and data")
    to = sealed["to"]
    if not isinstance(to, str) or not _KEY_ID.fullmatch(to):
        _reject("malformed", "sealed.to is not a key id")
    if device_key is None:
        _reject(
            "not a recipient", f"archive is sealed to device key {to}: pass the enrolled keys (--keys DIR)"
        )
    if device_key.key_id != to:
        _reject(
            "not a recipient",
            f"archive is sealed to device key {to}, this device's key is {device_key.key_id}",
        )
    try:
        plain = _HPKE.decrypt(
            _b64(sealed["data"], "sealed data"), device_key.private_key, info=_sealing_info(fleet, dev)
        )
    except Exception:
        _reject("integrity", "sealed files do not decrypt with this device's key")
    try:
        files = _checked_files(json.loads(plain))
    except ValueError:
        _reject("malformed", "sealed files are not JSON")
    return OpenedArchive(fleet, dev, issued, serial, signer_id, True, files)
