"""Outbox configuration, statistics and the item handed to the link."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edgeguard.errors import ConfigError

__all__ = ["OutboxConfig", "OutboxStats", "OutboxItem"]


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"outbox.{key}: {why}")


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Bounds and timing of the durable outbox. Every key is checked here; see docs/outbox.md.

    max_count / max_bytes: hard bounds of the stored backlog (results, and encrypted bytes). When a new result
        would exceed one, the oldest routine results are dropped first; priority results only when nothing
        routine is left. Every drop is counted.
    ttl_routine_s / ttl_priority_s: age after which a result of that class is dropped undelivered
        (None = never).
    commit_window_s: extra wait of the background committer for more results before one fsync'ed commit.
        0 (default): batching comes from results that arrive while a commit runs (group commit).
    max_batch: the most results in one commit.
    memory_max_count / memory_max_bytes: bound of the in-memory queue used while the disk is full.
    disk_retry_s: how often a degraded outbox tries the disk again.
    max_payload_bytes: the largest single result accepted by put().
    synchronous_full: fsync every commit (power-cut safe). False keeps kill -9 safety only (OS cache).
    """

    max_count: int = 1_000_000
    max_bytes: int = 512 * 1024 * 1024
    ttl_routine_s: float | None = 7 * 24 * 3600.0
    ttl_priority_s: float | None = None
    commit_window_s: float = 0.0
    max_batch: int = 2048
    memory_max_count: int = 10_000
    memory_max_bytes: int = 16 * 1024 * 1024
    disk_retry_s: float = 5.0
    max_payload_bytes: int = 256 * 1024
    synchronous_full: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.max_count <= 100_000_000, "max_count", "must be 1..100000000")
        _check(4096 <= self.max_bytes <= 1 << 40, "max_bytes", "must be 4096..2**40")
        for key in ("ttl_routine_s", "ttl_priority_s"):
            v = getattr(self, key)
            _check(v is None or (math.isfinite(v) and v > 0), key, "must be > 0 seconds or unset")
        _check(0.0 <= self.commit_window_s <= 0.5, "commit_window_s", "must be 0..0.5 s")
        _check(1 <= self.max_batch <= 100_000, "max_batch", "must be 1..100000")
        _check(1 <= self.memory_max_count <= 10_000_000, "memory_max_count", "must be 1..10000000")
        _check(1024 <= self.memory_max_bytes <= 1 << 34, "memory_max_bytes", "must be 1024..2**34")
        _check(0.01 <= self.disk_retry_s <= 3600, "disk_retry_s", "must be 0.01..3600 s")
        _check(1 <= self.max_payload_bytes <= 64 * 1024 * 1024, "max_payload_bytes", "must be 1..64 MiB")
        _check(self.max_payload_bytes <= self.max_bytes, "max_payload_bytes", "must not exceed max_bytes")


class OutboxItem(NamedTuple):
    """One stored result, decrypted, as the link publishes it (a tuple: built thousands of times a second)."""

    seq: int
    id: str
    kind: str
    priority: bool
    created: float
    payload: bytes


@dataclass(frozen=True)
class OutboxStats:
    """Figures for the heartbeat. ``alarm`` is set while results are not durable (disk full, I/O error)."""

    depth: int
    bytes: int
    memory_depth: int
    oldest_age_s: float | None
    next_seq: int
    dropped: dict[str, int] = field(default_factory=dict)
    alarm: str | None = None
    corrupt_files: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "bytes": self.bytes,
            "memory_depth": self.memory_depth,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3),
            "next_seq": self.next_seq,
            "dropped": dict(self.dropped),
            "dropped_total": self.dropped_total,
            "alarm": self.alarm,
            "corrupt_files": self.corrupt_files,
        }
