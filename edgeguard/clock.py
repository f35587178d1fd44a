"""A clock an attacker cannot wind back: the wall clock, never earlier than a persisted time floor.

A board without a battery-backed clock (a Raspberry Pi) boots with a stale time until NTP answers, and
anyone who can set the clock could otherwise revive an expired bundle. The floor is the latest trustworthy
time this device has seen (docs/security.md, "A clock that cannot be wound back"):

* ``RUNTIME_EPOCH``: no genuine clock reads earlier than the release of the code that is running;
* signed times: the ``created`` time of every bundle that verified (:meth:`TrustedClock.observe`);
* the wall clock itself, but only while it is synchronised: a periodic checkpoint while running and one at
  shutdown (:meth:`TrustedClock.checkpoint`).

``now()`` is ``max(wall clock, floor)``. An unsynchronised wall clock is used (a board with a real-time clock
keeps good time) but never written to the floor: a clock that is wrongly in the future would otherwise
refuse valid bundles forever, even after it is corrected. A signed time more than a day ahead of a
synchronised clock is not taken either (a publisher with a wrong clock must not lock devices out).

The floor lives in ``<state_dir>/time-floor`` (JSON, written with :func:`edgeguard._atomic.atomic_write`).
A missing, unreadable or corrupt file leaves the floor at the epoch and is reported in :meth:`state`
(the scan raises it) rather than stopping the service.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked

__all__ = ["RUNTIME_EPOCH", "TrustedClock", "ClockState", "clock_synchronised", "parse_time", "FLOOR_FILE"]

RUNTIME_EPOCH = datetime(2026, 11, 1, tzinfo=timezone.utc)  # raise with each release
FLOOR_FILE = "time-floor"
TIMESYNC_MARKER = Path("/run/systemd/timesync/synchronized")
_MAX_FLOOR_BYTES = 4096
_SIGNED_AHEAD = timedelta(days=1)
# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC both mean "not synchronised".
_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    # struct timex (include/uapi/linux/timex.h): the fields up to ``status``, then room for the rest.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


def clock_synchronised(marker: Path = TIMESYNC_MARKER) -> bool | None:
    """True when the kernel (or systemd-timesyncd) says the clock is synchronised, False when it says not,
    None where neither can be asked (not Linux)."""
    if marker.exists():  # systemd-timesyncd touches it on every successful sync
        return True
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tx = _Timex()  # modes = 0: read only, no privilege needed
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not tx.status & _STA_UNSYNC


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time with a zone (``Z`` accepted), as UTC; None when ``text`` is not one."""
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return None if t.tzinfo is None else t.astimezone(timezone.utc)


def _system_wall() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ClockState:
    now: datetime
    wall: datetime
    floor: datetime
    floor_source: str
    synchronised: bool | None
    problem: str | None  # the floor file could not be used

    @property
    def behind_s(self) -> float:
        """How far the wall clock is behind the floor (0 when it is not)."""
        return max(0.0, (self.floor - self.wall).total_seconds())

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "floor": self.floor.isoformat(),
            "floor_source": self.floor_source,
            "synchronised": self.synchronised,
            "wall_behind_floor_s": round(self.behind_s, 3),
            "problem": self.problem,
        }


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return t.astimezone(timezone.utc)


class TrustedClock:
    """``now()`` for every time-dependent check; ``observe()`` signed times; ``checkpoint()`` periodically.

    ``wall`` and ``synchronised`` are injectable (tests set the clock back without touching the system).
    Thread-safe: the service calls it from its loop and from executor threads.
    """

    def __init__(
        self,
        *,
        state_dir: Path | None,
        wall: Callable[[], datetime] = _system_wall,
        synchronised: Callable[[], bool | None] = clock_synchronised,
        epoch: datetime = RUNTIME_EPOCH,
    ) -> None:
        self._path = None if state_dir is None else Path(state_dir) / FLOOR_FILE
        self._wall = wall
        self._synchronised = synchronised
        self._lock = threading.Lock()
        self._floor, self._source = _aware(epoch, "epoch"), "runtime release"
        self._problem: str | None = None
        if self._path is not None:
            self._load(self._path)

    # -- reading
    def now(self) -> datetime:
        """The wall clock, or the floor when the wall clock is earlier (wound back, or a fresh board)."""
        wall = _aware(self._wall(), "the wall clock")
        with self._lock:
            return max(wall, self._floor)

    @property
    def floor(self) -> datetime:
        with self._lock:
            return self._floor

    def state(self) -> ClockState:
        wall = _aware(self._wall(), "the wall clock")
        with self._lock:
            floor, source, problem = self._floor, self._source, self._problem
        return ClockState(
            now=max(wall, floor),
            wall=wall,
            floor=floor,
            floor_source=source,
            synchronised=self._synchronised(),
            problem=problem,
        )

    # -- raising the floor
    def observe(self, signed: datetime, source: str) -> bool:
        """A time vouched for by a signature (a bundle's ``created``): raise the floor to it. True when the
        floor moved (and was persisted)."""
        signed = _aware(signed, "signed time")
        if self._synchronised() and signed > _aware(self._wall(), "the wall clock") + _SIGNED_AHEAD:
            return False  # the signer's clock is wrong, ours is right: do not lock the device out
        return self._raise(signed, source)

    def checkpoint(self, source: str = "checkpoint") -> bool:
        """Persist the wall clock as the floor, only while it is synchronised. True when the floor moved."""
        if not self._synchronised():
            return False
        return self._raise(_aware(self._wall(), "the wall clock"), source)

    def _raise(self, t: datetime, source: str) -> bool:
        with self._lock:
            if t <= self._floor:
                return False
            self._floor, self._source = t, source
            if self._path is not None:
                doc = {"floor": t.isoformat(), "source": source}
                try:
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(self._path, json.dumps(doc).encode(), mode=0o600)
                except OSError as exc:
                    # A full or read-only disk must not stop a model from loading: the floor holds in
                    # memory for this run, and the heartbeat and the scan say it was not persisted.
                    self._problem = f"{self._path}: not written ({exc.strerror or exc})"
                    return True
                self._problem = None
            return True

    def _load(self, path: Path) -> None:
        if not os.path.lexists(path):
            return  # no floor yet: a fresh device
        try:
            raw = read_checked(path, what="time floor", limit=_MAX_FLOOR_BYTES, error=OSError).data
        except OSError as exc:
            self._problem = str(exc)
            return
        try:
            doc = json.loads(raw)
            floor = _aware(datetime.fromisoformat(doc["floor"]), "floor")
            source = str(doc.get("source", "?"))[:128]
        except (ValueError, TypeError, KeyError):
            self._problem = f"{path}: corrupt time floor; restore or remove it"
            return
        if floor > self._floor:
            self._floor, self._source = floor, source
