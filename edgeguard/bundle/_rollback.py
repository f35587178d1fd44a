"""The rollback floor and the deployment slot: which bundles this device still accepts.

State under ``state_dir`` (the device's own directory, which the bundle writer cannot reach):

* ``rollback/<name>``: the floor of each model name, the lowest version still accepted, as decimal text;
* ``rollback.json``: a second record of every floor ever committed. A floor file that vanished while this
  record remembers it is refused (check ``rollback``), never read as "floor 0": deleting one file must not
  reopen the downgrade window. Where both exist the higher value counts;
* ``model-slot``: the name of the model this deployment slot serves, pinned by the first commit. When
  ``model.name`` is not configured, a bundle of another name is refused (check ``wrong model``): otherwise an
  older bundle under a fresh name, whose floor is 0, would replace the current model. Setting ``model.name``
  re-pins the slot; removing ``model-slot`` is the explicit reset (docs/bundle.md, "Rollback state").

Writes are atomic (``atomic_write``), so a crash leaves the old state or the new one, never a torn file. A
floor only ever goes up. Every commit re-checks and writes under one exclusive ``flock`` of ``rollback/``: the
check and the commit are one critical section, so a version below a floor committed meanwhile is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from pathlib import Path

from edgeguard._atomic import atomic_write
from edgeguard.errors import BundleRejected, ConfigError

__all__ = ["RollbackFloor", "MODEL_NAME_RE", "check_model_name"]

# Model names become file names: keep them to a safe, portable alphabet (also enforced in the manifest).
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_MAX_VERSION = 2**53  # stays exact in JSON numbers everywhere
_MAX_RECORD = 1024 * 1024  # rollback.json: ~30 bytes per model name ever served


def check_model_name(name: str, model_name: str | None) -> None:
    """``BundleRejected("wrong model")`` when the device is configured for another model name."""
    if model_name is not None and name != model_name:
        raise BundleRejected(
            "wrong model", f"bundle holds model {name!r}, this device serves model.name = {model_name!r}"
        )


def _read_state_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a small state file, or None when it does not exist. Opened once without following links
    and checked on the descriptor: a link or a device planted in the state dir is an error, not data."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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


class RollbackFloor:
    """Reads, checks and commits the rollback floors and the slot kept in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self._state = Path(state_dir)
        self._dir = self._state / "rollback"
        self._record_path = self._state / "rollback.json"
        self._slot_path = self._state / "model-slot"

    def _path(self, name: str) -> Path:
        if not MODEL_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid model name {name!r}")
        return self._dir / name

    def _file_floor(self, name: str) -> int | None:
        path = self._path(name)
        raw = _read_state_file(path, 64)
        if raw is None:
            return None
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            text = "?"
        # A corrupt floor must not silently become 0 (that would re-open the downgrade window): refuse.
        if not text.isdigit() or len(text) > 17:
            raise ConfigError(f"rollback floor {path} is corrupt ({text[:20]!r}); restore or remove it")
        return int(text)

    def _record(self) -> dict[str, int]:
        raw = _read_state_file(self._record_path, _MAX_RECORD)
        if raw is None:
            return {}
        try:
            doc = json.loads(raw)
            floors = doc["floors"]
            if not isinstance(floors, dict) or not all(
                isinstance(k, str) and type(v) is int and 0 <= v <= _MAX_VERSION for k, v in floors.items()
            ):
                raise ValueError("bad floors")
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"rollback record {self._record_path} is corrupt; restore or remove it"
            ) from None
        return dict(floors)

    def get(self, name: str) -> int:
        """The floor for ``name``; 0 when none was ever recorded. ``BundleRejected("rollback")`` when the
        floor file vanished although this device committed one (the second record remembers it)."""
        path = self._path(name)
        on_file = self._file_floor(name)
        remembered = self._record().get(name)
        if on_file is None:
            if remembered is not None:
                raise BundleRejected(
                    "rollback",
                    f"the rollback floor of {name} vanished ({path}) although this device served "
                    f"v{remembered}; restore it (a missing floor is not read as 0)",
                )
            return 0
        return max(on_file, remembered or 0)

    def slot(self) -> str | None:
        """The model name this deployment slot is pinned to, or None before anything was committed."""
        raw = _read_state_file(self._slot_path, 128)
        if raw is None:
            return None
        name = raw.decode("ascii", "replace").strip()
        if not MODEL_NAME_RE.fullmatch(name):
            raise ConfigError(f"model slot {self._slot_path} is corrupt; remove it to reset the slot")
        return name

    def check(self, name: str, version: int, *, model_name: str | None = None) -> None:
        """Would this device accept ``name`` v``version``? ``BundleRejected`` ("wrong model" or "rollback")
        if not. Without ``model_name`` the pinned slot decides which name is accepted."""
        check_model_name(name, model_name)
        slot = self.slot() if model_name is None else None
        if slot is not None and name != slot:
            raise BundleRejected(
                "wrong model",
                f"bundle holds model {name!r} but this device's slot is pinned to {slot!r} (the first model "
                f"it served); set model.name = {name!r} to change it, or reset the slot (docs/bundle.md)",
            )
        floor = self.get(name)
        if version < floor:
            raise BundleRejected("rollback", f"{name} v{version} is below this device's floor v{floor}")

    def commit(self, name: str, version: int, *, model_name: str | None = None) -> bool:
        """Check (as :meth:`check`) and record ``name`` v``version`` in one critical section: raise its floor,
        pin the slot to ``name``. True when the floor moved; ``BundleRejected`` when a floor committed
        meanwhile (by another open, or ``verify --commit``) is above ``version``."""
        if not 0 <= version <= _MAX_VERSION:
            raise ValueError(f"version {version} out of range")
        with self._locked():
            self.check(name, version, model_name=model_name)
            return self._write(name, version, pin=True)

    def raise_to(self, name: str, version: int) -> bool:
        """Record ``version`` as the floor if it is above the current one; True when the floor moved. Does not
        refuse a lower version (see :meth:`commit`) nor touch the slot."""
        if not 0 <= version <= _MAX_VERSION:
            raise ValueError(f"version {version} out of range")
        if version <= self.get(name):
            return False  # floors only go up, so this answer cannot go stale: no lock needed
        with self._locked():
            return self._write(name, version, pin=False)

    def _locked(self) -> _DirLock:
        self._dir.mkdir(parents=True, exist_ok=True)
        return _DirLock(self._dir)

    def _write(self, name: str, version: int, *, pin: bool) -> bool:
        # Under the lock. The floor file first, then the second record: a crash in between leaves the file
        # ahead of the record, and the higher of the two counts.
        current = self.get(name)
        moved = version > current
        if moved:
            atomic_write(self._path(name), f"{version}\n".encode("ascii"), mode=0o644)
        floor = max(version, current)
        record = self._record()
        if record.get(name, -1) < floor:
            record[name] = floor
            body = json.dumps({"floors": dict(sorted(record.items()))}, indent=1) + "\n"
            atomic_write(self._record_path, body.encode("ascii"), mode=0o644)
        if pin and self.slot() != name:
            atomic_write(self._slot_path, f"{name}\n".encode("ascii"), mode=0o644)
        return moved


class _DirLock:
    """An exclusive ``flock`` of a directory (no extra file appears next to the floors); released on exit."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock
