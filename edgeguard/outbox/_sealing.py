"""Encryption at rest and the sequence reservation file: outbox state kept outside the SQLite rows."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeguard._atomic import atomic_write

__all__ = ["NONCE", "Sealer", "SeqReservation"]

log = logging.getLogger("edgeguard.outbox")

NONCE = 12


class Sealer:
    """AES-256-GCM per row: ``blob = nonce || ciphertext+tag``, a fresh random 96-bit nonce each time, and the
    id, kind and class as associated data, so a row moved to another seq or class fails authentication."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, rid: str, kind: str, prio: int, payload: bytes) -> bytes:
        return nonce + self._aead.encrypt(nonce, payload, _aad(rid, kind, prio))

    def open(self, rid: str, kind: str, prio: int, blob: bytes) -> bytes | None:
        """The payload, or None when the row fails authentication (wrong key, tampered, moved)."""
        try:
            return self._aead.decrypt(blob[:NONCE], blob[NONCE:], _aad(rid, kind, prio))
        except InvalidTag:
            return None


def _aad(rid: str, kind: str, prio: int) -> bytes:
    # rid and kind never hold NUL (checked charsets), so the encoding is unambiguous.
    return f"{rid}\x00{kind}\x00{prio}".encode()


class SeqReservation:
    """Sequence numbers reserved in blocks in a side file (temp file, fsync, rename), so that ids stay unique
    even when the database is lost (corrupt, or results only in memory while the disk was full): a restart
    continues above the reservation."""

    BLOCK = 65_536

    def __init__(self, path: Path) -> None:
        self.path = path
        self.upto = self.read()

    def read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def reserve(self, upto: int) -> bool:
        try:
            atomic_write(self.path, str(upto).encode("ascii"))
        except OSError as exc:  # disk full: keep going; ids stay unique unless we also crash before recovery
            log.warning("cannot reserve outbox sequence numbers: %s", exc)
            return False
        self.upto = upto
        return True
