"""The device's Ed25519 signing key for audit checkpoints and the integrity baseline.

Until the service config names one (``device.signing_key``, being added with fleet provisioning), the worker
uses ``<state_dir>/device-sign.key`` and creates it (mode 0600, with ``device-sign.pub`` beside it) on first
start. Copy ``device-sign.pub`` off the device when it is provisioned: verifying a log against the public key
found next to it proves nothing to someone who could rewrite both.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard._atomic import atomic_write
from edgeguard.keys import load_publisher_key

__all__ = ["load_or_create_signing_key", "SIGNING_KEY_FILE", "SIGNING_PUB_FILE"]

SIGNING_KEY_FILE = "device-sign.key"
SIGNING_PUB_FILE = "device-sign.pub"


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The key in ``state_dir/device-sign.key`` (read like every key file: no link, 0600, bounded), or a new
    one written there atomically. A key file that exists but is unreadable is an error, never replaced."""
    path = state_dir / SIGNING_KEY_FILE
    if path.exists() or path.is_symlink():
        return load_publisher_key(path).private_key  # same PKCS#8 Ed25519 format and checks
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(state_dir / SIGNING_PUB_FILE, pub, mode=0o644)
    atomic_write(path, pem, mode=0o600)
    return key
