"""Durable replay protection: every accepted command's nonce is kept until its command can no longer be
accepted (its expiry plus the allowed clock skew), across restarts and power cuts.

SQLite in the state dir (``command-nonces.sqlite``, WAL, ``synchronous=FULL``): a nonce is committed to disk
before the command acts, so a crash between the two leaves a command refused on replay rather than run twice.
The store is bounded (``capacity`` rows); when full of nonces that have not expired yet it refuses new
commands ("nonce store full") instead of forgetting a nonce early, which would reopen the replay window.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from edgeguard.errors import CommandRefused

__all__ = ["NonceStore", "NONCE_FILE", "DEFAULT_CAPACITY"]

NONCE_FILE = "command-nonces.sqlite"
DEFAULT_CAPACITY = 100_000  # ~10 MB at most; a day of one command every second still fits


class NonceStore:
    def __init__(self, path: Path, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if not 1 <= capacity <= 10_000_000:
            raise ValueError("capacity must be 1..10,000,000")
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        # One connection used under the lock from whichever thread handles commands.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the commit is on disk before the command acts
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, keep_until REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS nonces_keep ON nonces (keep_until)")

    def record(self, nonce: str, *, keep_until: float, now: float) -> None:
        """Remember ``nonce`` until ``keep_until``; CommandRefused('replayed' / 'nonce store full')."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM nonces WHERE keep_until < ?", (now,))
                if db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone() is not None:
                    raise CommandRefused("replayed", f"nonce {nonce} was already used")
                (count,) = db.execute("SELECT COUNT(*) FROM nonces").fetchone()
                if count >= self.capacity:
                    raise CommandRefused(
                        "nonce store full",
                        f"{count} unexpired nonces kept (capacity {self.capacity}); retry after some expire",
                    )
                db.execute("INSERT INTO nonces (nonce, keep_until) VALUES (?, ?)", (nonce, keep_until))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
