"""The rollback floor: per model name, the lowest version this device still accepts.

One small file per model name under ``<state_dir>/rollback/``, holding the version as decimal text. Writes are
atomic (temp file in the same directory, fsync, ``os.replace``, fsync of the directory), so a crash leaves
either the old floor or the new one, never a torn or empty file. A floor only ever goes up.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError

__all__ = ["RollbackFloor", "MODEL_NAME_RE"]

# Model names become file names: keep them to a safe, portable alphabet (also enforced in the manifest).
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_MAX_VERSION = 2**53  # stays exact in JSON numbers everywhere


class RollbackFloor:
    """Reads and raises rollback floors kept in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir) / "rollback"

    def _path(self, name: str) -> Path:
        if not MODEL_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid model name {name!r}")
        return self._dir / name

    def get(self, name: str) -> int:
        """The floor for ``name``; 0 when none was ever recorded."""
        path = self._path(name)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read rollback floor {path}: {exc}") from None
        text = text.strip()
        # A corrupt floor must not silently become 0 (that would re-open the downgrade window): refuse.
        if not text.isdigit() or len(text) > 17:
            raise ConfigError(f"rollback floor {path} is corrupt ({text[:20]!r}); restore or remove it")
        return int(text)

    def raise_to(self, name: str, version: int) -> bool:
        """Record ``version`` as the floor if it is above the current one; True when the floor moved."""
        if not 0 <= version <= _MAX_VERSION:
            raise ValueError(f"version {version} out of range")
        if version <= self.get(name):
            return False  # floors only go up, so this answer cannot go stale: no lock needed
        self._dir.mkdir(parents=True, exist_ok=True)
        # Compare and write under an exclusive lock: two commits at once (the service and `verify --commit`)
        # must not let a lower version that read the old floor overwrite a higher one written meanwhile.
        # The lock is taken on the directory itself, so no extra file appears next to the floors.
        lock = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if version <= self.get(name):
                return False
            atomic_write(self._path(name), f"{version}\n".encode("ascii"), mode=0o644)
            return True
        finally:
            os.close(lock)  # releases the lock
