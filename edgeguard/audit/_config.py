"""The ``[audit]`` and ``[integrity]`` config sections (docs/service.md lists the keys)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["AuditConfig", "IntegrityConfig"]


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    enabled: bool = True
    checkpoint_records: int = 100  # a signed checkpoint after this many records ...
    checkpoint_s: float = 300.0  # ... or this long after the first record it does not cover yet
    max_file_bytes: int = 1024 * 1024  # a log file is rotated past this size
    max_files: int = 8  # retention: older files beyond this many are dropped (with a signed record of it)
    queue_size: int = 4096  # records waiting for the writer; more are counted and recorded as lost

    def __post_init__(self) -> None:
        if not 1 <= self.checkpoint_records <= 100_000:
            raise ValueError("audit.checkpoint_records must be 1..100000")
        if not (math.isfinite(self.checkpoint_s) and 0.05 <= self.checkpoint_s <= 86400):
            raise ValueError("audit.checkpoint_s must be 0.05..86400 s")
        if not 16 * 1024 <= self.max_file_bytes <= 1 << 30:
            raise ValueError("audit.max_file_bytes must be 16 KiB .. 1 GiB")
        if not 2 <= self.max_files <= 1000:
            raise ValueError("audit.max_files must be 2..1000")
        if not 16 <= self.queue_size <= 1_000_000:
            raise ValueError("audit.queue_size must be 16..1000000")


@dataclass(frozen=True, kw_only=True)
class IntegrityConfig:
    enabled: bool = True
    policy: Literal["alert", "refuse"] = "alert"
    interval_s: float = 300.0  # the periodic check (0: only at start and reload)
    # More files or directories to watch (the systemd unit file, say); the runtime package, the config, the
    # trust store, the revocation list, the tokens file and the hooks directory are always watched.
    paths: tuple[Path, ...] = field(default_factory=tuple)
    max_files: int = 4096  # per watched directory: more is an alert, not an unbounded walk
    max_file_bytes: int = 256 * 1024 * 1024  # a larger watched file is hashed up to here and flagged

    def __post_init__(self) -> None:
        if self.policy not in ("alert", "refuse"):
            raise ValueError('integrity.policy must be "alert" or "refuse"')
        if not (math.isfinite(self.interval_s) and (self.interval_s == 0 or 1 <= self.interval_s <= 86400)):
            raise ValueError("integrity.interval_s must be 0 or 1..86400 s")
        if not 1 <= self.max_files <= 1_000_000:
            raise ValueError("integrity.max_files must be 1..1000000")
        if not 1 <= self.max_file_bytes <= 1 << 40:
            raise ValueError("integrity.max_file_bytes must be 1 .. 1 TiB")
