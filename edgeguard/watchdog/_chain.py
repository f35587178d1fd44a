"""The watchdog chain: every configured watchdog, kicked together and only while health checks pass.

A watchdog that is kicked unconditionally (from a timer thread, say) proves only that the timer runs. Here the
caller passes the verdict of the health checks to :meth:`WatchdogChain.tick`; a failing check stops every
kick, so systemd restarts the service and the hardware watchdogs reset the board if that does not help either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edgeguard.errors import WatchdogError

from ._systemd import SystemdNotifier

__all__ = ["Watchdog", "WatchdogChain"]

_log = logging.getLogger("edgeguard.watchdog")


class Watchdog(Protocol):
    kind: str

    @property
    def kick_interval_s(self) -> float: ...
    def open(self) -> None: ...
    def kick(self) -> bool: ...
    def close(self, *, clean: bool = True) -> None: ...


class _SystemdWatchdog:
    """Adapts the notifier's WATCHDOG=1 to the chain (it is opened by systemd, not by us)."""

    kind = "systemd"

    def __init__(self, notifier: SystemdNotifier) -> None:
        self._n = notifier

    @property
    def kick_interval_s(self) -> float:
        return self._n.kick_interval_s or 1.0

    def open(self) -> None:
        return None

    def kick(self) -> bool:
        return self._n.kick()

    def close(self, *, clean: bool = True) -> None:
        return None


class WatchdogChain:
    def __init__(
        self,
        *,
        notifier: SystemdNotifier,
        watchdogs: Sequence[Watchdog] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        chain: list[Watchdog] = []
        if notifier.watchdog_enabled:
            chain.append(_SystemdWatchdog(notifier))
        chain.extend(watchdogs)
        self._chain = chain
        self._clock = clock
        self._last_kick: dict[int, float] = {}
        self.withheld = 0  # ticks on which health checks failed and no watchdog was kicked
        self.failures = 0
        self.last_verdict: tuple[bool, str] = (True, "")

    @property
    def kinds(self) -> list[str]:
        return [w.kind for w in self._chain]

    def open(self) -> None:
        for w in self._chain:
            w.open()

    def tick(self, *, healthy: bool, reason: str = "") -> int:
        """Kick every watchdog whose interval is due, if ``healthy``; returns how many were kicked."""
        self.last_verdict = (healthy, reason)
        if not healthy:
            self.withheld += 1
            return 0
        now = self._clock()
        kicked = 0
        for i, w in enumerate(self._chain):
            last = self._last_kick.get(i)
            if last is not None and now - last < w.kick_interval_s:
                continue
            try:
                ok = w.kick()
            except WatchdogError as exc:
                self.failures += 1
                _log.warning("%s", exc)
                ok = False
            if ok:
                self._last_kick[i] = now
                kicked += 1
        return kicked

    def close(self, *, clean: bool) -> None:
        for w in self._chain:
            try:
                w.close(clean=clean)
            except WatchdogError as exc:
                _log.warning("%s", exc)

    def snapshot(self) -> dict[str, Any]:
        return {
            "kinds": self.kinds,
            "healthy": self.last_verdict[0],
            "reason": self.last_verdict[1],
            "withheld": self.withheld,
            "failures": self.failures,
        }
