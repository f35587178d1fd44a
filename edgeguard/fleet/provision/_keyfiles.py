"""Key and certificate files of the fleet directory: created when missing (0600, never overwritten), reused
when present, so that every fleet command can be re-run."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError, KeyFileError
from edgeguard.provisioning import load_private_pem, new_private_file

from . import _pki as pki

__all__ = ["ensure_ed25519", "ensure_ec_key", "read_cert"]

_PEM_PUB = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def ensure_ed25519(key_path: Path, pub_path: Path) -> Ed25519PublicKey:
    """An Ed25519 key pair in the publisher key's PEM format (``edgeguard keygen``); kept when present."""
    if key_path.exists():
        key = load_private_pem(key_path)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{key_path}: expected an Ed25519 private key")
        return key.public_key()
    new = Ed25519PrivateKey.generate()
    new_private_file(
        key_path,
        new.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    atomic_write(pub_path, new.public_key().public_bytes(*_PEM_PUB), mode=0o644)
    return new.public_key()


def ensure_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = load_private_pem(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{path}: expected an EC private key")
        return key
    key = pki.new_key()
    new_private_file(path, pki.key_pem(key))
    return key


def read_cert(path: Path) -> x509.Certificate | None:
    if not path.exists():
        return None
    data = read_checked(path, what="certificate", limit=64 * 1024, error=ConfigError).data
    return x509.load_pem_x509_certificate(data)
