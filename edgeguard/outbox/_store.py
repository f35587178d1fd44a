"""The SQLite seam of the outbox: schema, one writer connection, one reader connection, counters in `meta`.

Start-up reads a handful of `meta` rows and never scans `results`, so a backlog of millions opens instantly.
The counters (`count`, `bytes`, `next_seq`, drops) change in the same transaction as the rows they describe,
so they are exact after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Store", "StoreCorrupt", "StoreFull", "Row", "NO_EXPIRY", "META_KEYS", "classify"]

# A float far in the future instead of NULL, so `expires > now` is one index range without an IS NULL branch.
NO_EXPIRY = 1e300

META_KEYS = (
    "next_seq",
    "count",
    "bytes",
    "dropped_capacity_routine",
    "dropped_capacity_priority",
    "dropped_expired",
    "dropped_tampered",
    "dropped_corrupt",
    "dropped_memory_full",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    size INTEGER NOT NULL,
    blob BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS results_class ON results (priority, seq);
"""

# (seq, priority, kind, created, expires, size, blob)
Row = tuple[int, int, str, float, float, int, bytes]


class StoreCorrupt(Exception):
    """The database file is not a usable SQLite database (moved aside by the outbox)."""


class StoreFull(Exception):
    """The disk (or the database's page limit) is full, or the file system failed to write."""


def classify(exc: BaseException) -> type[Exception] | None:
    """Map what sqlite3/the OS raised to StoreFull, StoreCorrupt, or None (a bug: let it propagate)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        return StoreFull
    if isinstance(exc, sqlite3.DatabaseError):
        msg = str(exc).lower()
        if "full" in msg or "disk i/o" in msg or "readonly" in msg or "unable to open" in msg:
            return StoreFull
        if isinstance(exc, sqlite3.OperationalError) and "locked" in msg:
            return StoreFull  # another process holds the file: treat as unavailable, retry later
        if "malformed" in msg or "not a database" in msg or "corrupt" in msg or "no such table" in msg:
            return StoreCorrupt
        if type(exc) is sqlite3.DatabaseError:
            return StoreCorrupt
    return None


class Store:
    """Owns the writer connection (committer thread only) and a reader connection (guarded by the caller)."""

    def __init__(self, path: Path, *, synchronous_full: bool) -> None:
        self.path = path
        self._synchronous_full = synchronous_full
        self._sync_now = synchronous_full
        self.meta: dict[str, int] = dict.fromkeys(META_KEYS, 0)
        try:
            self.w = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self.w.execute("PRAGMA journal_mode=WAL").fetchone()
            self.w.execute(f"PRAGMA synchronous={'FULL' if synchronous_full else 'NORMAL'}")
            self.w.executescript(_SCHEMA)
            for key, value in self.w.execute("SELECT key, value FROM meta"):
                if key in self.meta:
                    self.meta[key] = int(value)
            self.r = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self.r.execute("SELECT 1 FROM results LIMIT 1").fetchall()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            kind = classify(exc)
            if kind is StoreFull:
                raise StoreFull(str(exc)) from exc
            raise StoreCorrupt(str(exc)) from exc

    # ---------------------------------------------------------------------------- writer (committer thread)
    def write(
        self,
        rows: Sequence[Row],
        acks: Iterable[int],
        *,
        now: float,
        max_count: int,
        max_bytes: int,
        expire: bool,
        next_seq: int,
    ) -> dict[str, int]:
        """One transaction: insert ``rows``, delete acknowledged seqs, expire, enforce bounds, save counters.
        Returns the drops it made by reason. On failure nothing changed (rolled back) and the counters in
        ``self.meta`` are untouched."""
        meta = dict(self.meta)
        drops: dict[str, int] = {}
        c = self.w
        # Only new results need an fsync before we answer; a transaction that only removes delivered ones
        # may sit in the OS cache (WAL keeps commit order, the next fsync'ed commit carries it to disk; a
        # power cut before that re-sends a few results with ids the consumer has already seen).
        want_full = self._synchronous_full and bool(rows)
        if want_full != self._sync_now:
            c.execute(f"PRAGMA synchronous={'FULL' if want_full else 'NORMAL'}")
            self._sync_now = want_full
        try:
            c.execute("BEGIN IMMEDIATE")
            if rows:
                c.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?)", rows)
                meta["count"] += len(rows)
                meta["bytes"] += sum(r[5] for r in rows)
            # Acks arrive in order, so they are mostly one run of consecutive seqs: one range count and one
            # range delete per run, counted in SQLite, instead of a row handed back to Python per result.
            for lo, hi in _runs(acks):
                n, size = c.execute(
                    "SELECT count(*), total(size) FROM results WHERE seq BETWEEN ? AND ?", (lo, hi)
                ).fetchone()
                if n:
                    c.execute("DELETE FROM results WHERE seq BETWEEN ? AND ?", (lo, hi))
                    meta["count"] -= n
                    meta["bytes"] -= int(size)
            if expire:
                self._expire(meta, drops, now)
            self._enforce_bounds(meta, drops, max_count, max_bytes)
            meta["next_seq"] = max(meta["next_seq"], next_seq)
            for reason, n in drops.items():
                key = {"routine": "dropped_capacity_routine", "priority": "dropped_capacity_priority"}.get(
                    reason, f"dropped_{reason}"
                )
                meta[key] += n
            changed = [(k, v) for k, v in meta.items() if v != self.meta.get(k)]
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", changed)
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise
        self.meta = meta
        return drops

    def _expire(self, meta: dict[str, int], drops: dict[str, int], now: float) -> None:
        # A class has one TTL, so within a class `expires` grows with `seq`: walk the (priority, seq) index
        # from the oldest and stop at the first live row (no index on `expires` to keep up on every insert).
        for prio in (0, 1):
            last = -1
            n = b = 0
            done = False
            while not done:
                chunk = self.w.execute(
                    "SELECT seq, size, expires FROM results WHERE priority = ? AND seq > ? "
                    "ORDER BY seq LIMIT 512",
                    (prio, last),
                ).fetchall()
                if not chunk:
                    break
                for seq, size, expires in chunk:
                    if expires > now:
                        done = True
                        break
                    last, n, b = seq, n + 1, b + size
            if n:
                self.w.execute("DELETE FROM results WHERE priority = ? AND seq <= ?", (prio, last))
                meta["count"] -= n
                meta["bytes"] -= b
                drops["expired"] = drops.get("expired", 0) + n

    def _enforce_bounds(
        self, meta: dict[str, int], drops: dict[str, int], max_count: int, max_bytes: int
    ) -> None:
        # Oldest routine results go first; priority results only when no routine result is left.
        for prio, reason in ((0, "routine"), (1, "priority")):
            over_n = meta["count"] - max_count
            over_b = meta["bytes"] - max_bytes
            if over_n <= 0 and over_b <= 0:
                return
            last = None
            n = b = 0
            while n < over_n or b < over_b:
                chunk = self.w.execute(
                    "SELECT seq, size FROM results WHERE priority = ? AND seq > ? ORDER BY seq LIMIT 512",
                    (prio, -1 if last is None else last),
                ).fetchall()
                if not chunk:
                    break
                for seq, size in chunk:
                    last = seq
                    n += 1
                    b += size
                    if n >= over_n and b >= over_b:
                        break
            if last is None:
                continue
            self.w.execute("DELETE FROM results WHERE priority = ? AND seq <= ?", (prio, last))
            meta["count"] -= n
            meta["bytes"] -= b
            drops[reason] = drops.get(reason, 0) + n

    def bump_meta(self, key: str, n: int) -> None:
        """Add ``n`` to a counter outside a batch (drops noticed by the reader, e.g. a tampered row)."""
        self.meta[key] = self.meta.get(key, 0) + n
        self.w.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, self.meta[key]))

    # ----------------------------------------------------------------------------------- reader (link thread)
    def peek(self, after: int, limit: int, now: float) -> list[tuple[int, int, str, float, bytes]]:
        return self.r.execute(
            "SELECT seq, priority, kind, created, blob FROM results WHERE seq > ? AND expires > ? "
            "ORDER BY seq LIMIT ?",
            (after, now, limit),
        ).fetchall()

    def oldest_created(self) -> float | None:
        row = self.r.execute("SELECT created FROM results ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        for name in ("r", "w"):
            conn = getattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """``seqs`` as runs of consecutive integers, (first, last) each: a range holds exactly the listed seqs."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def move_aside(path: Path, stamp: str) -> Path:
    """Rename a corrupt database (and its -wal/-shm) to ``<name>.corrupt-<stamp>``; kept for inspection."""
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(target) + suffix))
    return target
