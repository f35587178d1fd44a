"""Key files, key ids, the publisher trust store and the storage key derived from the device key.

Two key kinds, both standard PEM so that ``openssl pkey -in KEY -text`` can read them:

* publisher: Ed25519 (PKCS#8 ``publisher.key``, SubjectPublicKeyInfo ``publisher.pub``) signs bundles;
* device: X25519 (``device.key`` / ``device.pub``) receives content keys wrapped with HPKE (RFC 9180);
* operator: Ed25519 (``operator.key`` / ``operator.pub``) signs remote commands (docs/commands.md);
* device-sign: Ed25519 (``device-sign.key`` / ``device-sign.pub``) signs a device's command answers.

A key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key. Private key files are written
mode 0600 and, like ssh does, refused when group or others may read them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeguard._echo import echo
from edgeguard._safeio import read_checked
from edgeguard.errors import BundleRejected, KeyFileError

__all__ = [
    "KeyKind",
    "PublisherKey",
    "DeviceKey",
    "RecipientKey",
    "TrustStore",
    "generate_keypair",
    "load_publisher_key",
    "load_device_key",
    "load_recipient_key",
    "load_trusted_key",
    "load_signing_key",
    "load_verify_key",
    "read_revocation_list",
    "derive_storage_key",
    "public_key_id",
]

KeyKind = Literal["publisher", "device", "operator", "device-sign"]
_ED25519_KINDS = ("publisher", "operator", "device-sign")
_MAX_KEY_FILE = 16 * 1024
_MAX_REVOCATION_LIST = 1024 * 1024  # ~58,000 key ids
_STORAGE_KEY_INFO = b"edgeguard/v1 outbox storage key"
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"
_PRIVATE_PEM = b"PRIVATE KEY-----"  # PKCS#8 "BEGIN PRIVATE KEY" and the older "BEGIN <ALG> PRIVATE KEY"


def public_key_id(key: Ed25519PublicKey | X25519PublicKey) -> str:
    """First 8 bytes (16 hex digits) of SHA-256 over the raw public key (the header holds the raw bytes)."""
    return hashlib.sha256(key.public_bytes(*_RAW)).digest()[:8].hex()


@dataclass(frozen=True)
class PublisherKey:
    """An Ed25519 signing key (publisher side only)."""

    private_key: Ed25519PrivateKey
    key_id: str


@dataclass(frozen=True)
class DeviceKey:
    """A device's X25519 key: unwraps content keys and derives the storage key."""

    private_key: X25519PrivateKey
    key_id: str


@dataclass(frozen=True)
class RecipientKey:
    """A device's public key as the publisher sees it."""

    public_key: X25519PublicKey
    key_id: str


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite an existing key; mode 0600 at creation, so there is no window of wider access.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(kind: KeyKind, out_dir: Path) -> tuple[Path, Path, str]:
    """Write ``out_dir/<kind>.key`` (0600) and ``<kind>.pub``; return both paths and the key id."""
    if kind not in ("publisher", "device", "operator", "device-sign"):
        raise ValueError(f"unknown key kind {kind!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{kind}.key", out_dir / f"{kind}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists; refusing to overwrite a key")
    private: Ed25519PrivateKey | X25519PrivateKey = (
        Ed25519PrivateKey.generate() if kind in _ED25519_KINDS else X25519PrivateKey.generate()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key()
    _write_private(key_path, pem)
    pub_path.write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_path, pub_path, public_key_id(pub)


def _read_key_file(
    path: Path,
    *,
    private: bool,
    kind: KeyKind | None = None,
    what: str = "key file",
    limit: int = _MAX_KEY_FILE,
) -> bytes:
    # The shared pattern for files others may write: one descriptor opened without following links, checked
    # with fstat (regular file, mode) and read with a bound, so a path swapped after a stat() cannot slip in.
    checked = read_checked(path, what=what, limit=limit, error=KeyFileError)
    data = checked.data
    # The kind of key first, then its mode: advising `chmod 600` on a public key handed over by mistake
    # would send the user the wrong way.
    if kind is not None and private and _PUBLIC_PEM in data:
        raise KeyFileError(f"{path} is a public key; pass the {kind}'s private key ({kind}.key)")
    if kind is not None and not private and _PRIVATE_PEM in data:
        raise KeyFileError(f"{path} is a private key; pass the {kind}'s public key ({kind}.pub)")
    if private and checked.mode & 0o077:
        raise KeyFileError(
            f"permissions {checked.mode:04o} for '{path}' are too open: a private key must "
            f"not be accessible by group or others (run: chmod 600 {path})"
        )
    return data


def _load_private(path: Path, kind: KeyKind) -> Ed25519PrivateKey | X25519PrivateKey:
    data = _read_key_file(path, private=True, kind=kind)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        raise KeyFileError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _load_public(path: Path, kind: KeyKind) -> Ed25519PublicKey | X25519PublicKey:
    data = _read_key_file(path, private=False, kind=kind)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, (Ed25519PublicKey, X25519PublicKey)):
        raise KeyFileError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_publisher_key(path: Path) -> PublisherKey:
    key = _load_private(path, "publisher")
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected a publisher (Ed25519) private key, found a device key")
    return PublisherKey(private_key=key, key_id=public_key_id(key.public_key()))


def load_device_key(path: Path) -> DeviceKey:
    key = _load_private(path, "device")
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path}: expected a device (X25519) private key, found a publisher key")
    return DeviceKey(private_key=key, key_id=public_key_id(key.public_key()))


def load_recipient_key(path: Path) -> RecipientKey:
    key = _load_public(path, "device")
    if not isinstance(key, X25519PublicKey):
        raise KeyFileError(f"{path}: expected a device (X25519) public key, found a publisher key")
    return RecipientKey(public_key=key, key_id=public_key_id(key))


def load_trusted_key(path: Path) -> Ed25519PublicKey:
    key = _load_public(path, "publisher")
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected a publisher (Ed25519) public key, found a device key")
    return key


def load_signing_key(path: Path, kind: KeyKind = "operator") -> Ed25519PrivateKey:
    """An Ed25519 private key that signs something other than bundles: an operator's commands or a device's
    answers. Same format, checks and mode rule as the publisher key."""
    key = _load_private(path, kind)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an {kind} (Ed25519) private key, found an X25519 key")
    return key


def load_verify_key(path: Path, kind: KeyKind = "operator") -> Ed25519PublicKey:
    """The public half of :func:`load_signing_key` (``operator.pub`` or a device's ``device-sign.pub``)."""
    key = _load_public(path, kind)
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected an {kind} (Ed25519) public key, found an X25519 key")
    return key


def _check_key_id(text: str, origin: str) -> str:
    kid = text.strip().lower()
    if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
        raise KeyFileError(f"{origin}: {echo(text.strip())} is not a key id (16 hex digits)")
    return kid


def read_revocation_list(path: Path) -> frozenset[str]:
    """One key id (16 hex digits) per line; blank lines and text after '#' are ignored. Read like a key file
    (one checked open, regular file only, at most 1 MiB): a FIFO or device put in its place must not hang or
    flood a reload."""
    data = _read_key_file(path, private=False, what="revocation list", limit=_MAX_REVOCATION_LIST)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"revocation list {path} is not UTF-8 text") from None
    ids = set()
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.add(_check_key_id(entry, f"{path}:{n}"))
    return frozenset(ids)


class TrustStore:
    """The publisher keys a device accepts, by key id, and the key ids it refuses.

    Rotation: trust the old and the new key at once, then drop (or revoke) the old one. Revocation wins over
    trust: a revoked key id is refused even while its key is still listed.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey] = (), *, revoked: Iterable[str] = ()) -> None:
        self._keys = {public_key_id(k): k for k in keys}
        self._revoked = frozenset(_check_key_id(r, "revoked key id") for r in revoked)

    @classmethod
    def from_files(
        cls,
        trusted: Iterable[Path],
        *,
        revocation_list: Path | None = None,
        revoked: Iterable[str] = (),
    ) -> TrustStore:
        ids = set(revoked)
        if revocation_list is not None:
            ids |= read_revocation_list(revocation_list)
        return cls([load_trusted_key(p) for p in trusted], revoked=ids)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @property
    def revoked(self) -> frozenset[str]:
        return self._revoked

    def signer(self, key_id: str) -> Ed25519PublicKey:
        """The trusted key with ``key_id``, or BundleRejected('revoked' / 'untrusted signer')."""
        if key_id in self._revoked:
            raise BundleRejected("revoked", f"publisher key {key_id} has been revoked")
        key = self._keys.get(key_id)
        if key is None:
            raise BundleRejected("untrusted signer", f"publisher key {key_id} is not in the trust store")
        return key


def derive_storage_key(device_key: DeviceKey) -> bytes:
    """32 bytes for encrypting device state at rest (the outbox), derived with HKDF-SHA256 (RFC 5869) from the
    device's private key: a separate label keeps it independent of every other use of that key."""
    raw = device_key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_STORAGE_KEY_INFO).derive(raw)
