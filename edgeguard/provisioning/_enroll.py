"""``edgeguard enroll``: the device makes its keys and a certificate signing request; no private key leaves.

The CSR (PKCS#10, signed by the device's TLS key, P-256) names the device in its subject CN and carries the
public halves of the two other device keys as SAN URIs, so the one file the operator signs binds all three:

    urn:edgeguard:device-key:<64 hex digits, raw X25519 public key>   (bundles, sealed archive)
    urn:edgeguard:device-sign-key:<64 hex digits, raw Ed25519 public key> (command answers, audit)

Re-running keeps the keys (the same CSR keys come out), so an interrupted enrolment can simply be repeated.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError, KeyFileError
from edgeguard.keys import generate_keypair, load_device_key, public_key_id

__all__ = [
    "DEVICE_KEY_URN",
    "SIGN_KEY_URN",
    "Enrolment",
    "enroll",
    "load_private_pem",
    "new_private_file",
    "FLEET_KEY_ID_FILE",
]

DEVICE_KEY_URN = "urn:edgeguard:device-key:"
SIGN_KEY_URN = "urn:edgeguard:device-sign-key:"
FLEET_KEY_ID_FILE = "fleet-key-id"  # the fleet key id the device pins for its archive (optional)
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_PEM_PUB = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Enrolment:
    csr: Path
    device_key_id: str
    sign_key_id: str
    created: bool  # False: existing keys were reused


def new_private_file(path: Path, pem: bytes) -> None:
    """A new private key file: O_EXCL (never overwrite a key), mode 0600 from creation, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pkcs8(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_pem(path: Path) -> object:
    """A private key file of ours, read like every key file (checked open, mode 0600)."""
    from edgeguard.keys import _read_key_file  # noqa: PLC0415 - the shared checked reader, private to keys

    data = _read_key_file(path, private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def _ensure_sign_key(out: Path) -> Ed25519PrivateKey:
    key_path = out / "device-sign.key"
    if key_path.exists():
        key = load_private_pem(key_path)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{key_path}: expected an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    new_private_file(key_path, _pkcs8(key))
    atomic_write(out / "device-sign.pub", key.public_key().public_bytes(*_PEM_PUB), mode=0o644)
    return key


def _ensure_tls_key(out: Path) -> ec.EllipticCurvePrivateKey:
    key_path = out / "client.key"
    if key_path.exists():
        key = load_private_pem(key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{key_path}: expected an EC (P-256) private key")
        return key
    # P-256: every TLS stack and broker accepts it, and it is fast to generate on a small board.
    key = ec.generate_private_key(ec.SECP256R1())
    new_private_file(key_path, _pkcs8(key))
    return key


def enroll(device_id: str, out: Path, *, fleet_key_id: str | None = None) -> Enrolment:
    """Create (or reuse) the device's keys in ``out`` and write ``out/device.csr``."""
    if not _ID.fullmatch(device_id):
        raise ConfigError(f"--id {device_id!r}: 1..64 of A-Z a-z 0-9 _ . -")
    if fleet_key_id is not None and not re.fullmatch(r"[0-9a-fA-F]{16}", fleet_key_id):
        raise ConfigError(
            f"--fleet-key-id {fleet_key_id!r}: 16 hex digits (printed by `edgeguard fleet init`)"
        )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = not (out / "device.key").exists()
    if created:
        generate_keypair("device", out)
    device_key = load_device_key(out / "device.key")
    sign_key = _ensure_sign_key(out)
    tls_key = _ensure_tls_key(out)
    device_pub = device_key.private_key.public_key()
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(DEVICE_KEY_URN + device_pub.public_bytes(*_RAW).hex()),
        x509.UniformResourceIdentifier(SIGN_KEY_URN + sign_key.public_key().public_bytes(*_RAW).hex()),
    ]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    csr_path = out / "device.csr"
    atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    if fleet_key_id is not None:
        atomic_write(out / FLEET_KEY_ID_FILE, fleet_key_id.lower().encode() + b"\n", mode=0o644)
    return Enrolment(
        csr=csr_path,
        device_key_id=device_key.key_id,
        sign_key_id=public_key_id(sign_key.public_key()),
        created=created,
    )
