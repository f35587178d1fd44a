"""The A/B slots, the slot record and the refused versions: the deploy state a power cut must not tear.

Under ``<state_dir>``:

* ``slots/a/bundle.egm``, ``slots/b/bundle.egm``: SEALED bundles (exactly the bytes that were verified; the
  plaintext exists only in memory, as for any bundle);
* ``slots/record.json``: which slot is active (``a``, ``b``, or ``config`` for ``model.bundle``), which one is
  the rollback target, and the deploy state (``probation`` or ``committed``) — written atomically, so a power
  cut leaves the old record or the new one;
* ``deploy/refused.json``: the versions rolled back after a failed probation, refused from then on;
* ``deploy/partial-<sha256>.egm``: a bundle being fetched (ciphertext only; removed at start).

The commit point of a deploy is the record saying ``committed``: a device that boots with a record in
``probation`` rolls back (the worker crashed, hung or lost power while on probation), so before that point it
comes back on the previous model and after it on the new one.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError

__all__ = ["SlotName", "SlotRecord", "SlotStore", "RefusedVersions", "SLOTS"]

SlotName = Literal["a", "b", "config"]
SLOTS: Final = ("a", "b")
_RECORD_MAX = 4096
_REFUSED_MAX_BYTES = 256 * 1024
_REFUSED_MAX = 256  # entries kept; the oldest go first (their versions are long below the floor)
_STATES = ("probation", "committed", "rolled-back")


def read_small(path: Path, limit: int) -> bytes | None:
    """A state file's bytes or None when absent; opened without following links, regular files only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path} is larger than {limit} bytes")
    return data


@dataclass(frozen=True)
class SlotRecord:
    active: SlotName = "config"
    previous: SlotName | None = None
    state: str = "committed"  # probation | committed | rolled-back
    model: str | None = None
    version: int | None = None  # of the active slot's bundle (None: model.bundle, never deployed)
    previous_version: int | None = None
    rollout: str | None = None
    probation_until: float | None = None
    max_error_rate: float = 0.05
    max_p95_ms: float | None = None
    reason: str | None = None
    rolled_back: int | None = None  # the version the last rollback left
    time: float = 0.0

    def to_json(self) -> bytes:
        return (json.dumps(self.__dict__, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes, path: Path) -> SlotRecord:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or set(doc) - set(cls.__dataclass_fields__):
                raise ValueError("keys")
            rec = cls(**doc)
            if rec.active not in ("a", "b", "config") or rec.previous not in ("a", "b", "config", None):
                raise ValueError("slot")
            if rec.state not in _STATES:
                raise ValueError("state")
        except (ValueError, TypeError):
            raise ConfigError(
                f"slot record {path} is corrupt; restore it or remove it to serve model.bundle"
            ) from None
        return rec

    def but(self, **changes: Any) -> SlotRecord:
        return replace(self, time=time.time(), **changes)


class SlotStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "slots"
        self.record_path = self.dir / "record.json"

    def bundle_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"slot {slot!r}")
        return self.dir / slot / "bundle.egm"

    def read(self) -> SlotRecord:
        raw = read_small(self.record_path, _RECORD_MAX)
        return SlotRecord() if raw is None else SlotRecord.parse(raw, self.record_path)

    def write(self, record: SlotRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path, record.to_json(), mode=0o600)

    def free_slot(self, record: SlotRecord) -> str:
        """Where the next bundle goes: never the active slot."""
        return "b" if record.active == "a" else "a"

    def install(self, partial: Path, slot: str) -> Path:
        """Move a verified, fetched bundle into ``slot`` (a rename within the state dir: atomic), durably."""
        target = self.bundle_path(slot)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(partial, target)
        _fsync_dir(target.parent)
        return target

    def remove(self, slot: str) -> None:
        self.bundle_path(slot).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RefusedVersions:
    """(model, version) pairs rolled back after a failed probation; a later deploy of one is refused."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "deploy" / "refused.json"

    def entries(self) -> list[dict[str, Any]]:
        raw = read_small(self.path, _REFUSED_MAX_BYTES)
        if raw is None:
            return []
        try:
            doc = json.loads(raw)
            items = doc["refused"]
            if not isinstance(items, list) or not all(
                isinstance(e, dict) and isinstance(e.get("model"), str) and type(e.get("version")) is int
                for e in items
            ):
                raise ValueError("entries")
        except (ValueError, KeyError, TypeError):
            # Fail closed would refuse every deploy forever; fail open would re-admit a known-bad version.
            # Refuse loudly: the operator restores or removes the file.
            raise ConfigError(f"refused-versions list {self.path} is corrupt; restore or remove it") from None
        return items

    def reason(self, model: str, version: int) -> str | None:
        for e in self.entries():
            if e["model"] == model and e["version"] == version:
                return str(e.get("reason") or "rolled back")
        return None

    def add(self, model: str, version: int, reason: str) -> None:
        items = [e for e in self.entries() if not (e["model"] == model and e["version"] == version)]
        items.append({"model": model, "version": version, "reason": reason[:300], "time": int(time.time())})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"refused": items[-_REFUSED_MAX:]}, indent=1) + "\n"
        atomic_write(self.path, body.encode(), mode=0o600)
