"""The posture inside the running service: a scan at start and daily, clock checkpoints, heartbeat fields.

Everything that touches files or runs a tool (the scan, a checkpoint's fsync) runs in an executor thread,
never on the loop that keeps the service alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgeguard._hardening import memory_protection, process_hardening
from edgeguard.clock import TrustedClock

from ._checks import run_scan
from ._findings import ScanReport
from ._host import HostProbe

if TYPE_CHECKING:  # the service imports this package: no import of it at run time
    from edgeguard.service.config import ServiceConfig

__all__ = ["PostureMonitor", "SCAN_INTERVAL_S", "CHECKPOINT_INTERVAL_S", "MAX_FINDING_EVENTS"]

_log = logging.getLogger("edgeguard.posture")

SCAN_INTERVAL_S = 24 * 3600.0
CHECKPOINT_INTERVAL_S = 3600.0  # how much a wound-back clock can regain after a crash without a clean stop
MAX_FINDING_EVENTS = 32  # per scan: the events queue is bounded, a long list must not push out others


class PostureMonitor:
    def __init__(
        self,
        *,
        config: Callable[[], ServiceConfig],
        clock: TrustedClock,
        publish: Callable[[str, dict[str, Any]], None],
        host: HostProbe | None = None,
        scan_interval_s: float = SCAN_INTERVAL_S,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        self._config = config
        self.clock = clock
        self._publish = publish
        self._host = host
        self._scan_s = scan_interval_s
        self._checkpoint_s = checkpoint_interval_s
        self._task: asyncio.Task[None] | None = None
        self.last: ScanReport | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def stop(self) -> None:
        """Cancel the periodic work and persist the clock once more (a clean shutdown is a checkpoint)."""
        if self._task is not None:
            self._task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._checkpoint, "shutdown")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_scan = -float("inf")
        while True:
            if time.monotonic() - last_scan >= self._scan_s:
                last_scan = time.monotonic()
                await loop.run_in_executor(None, self.scan_now)
            await loop.run_in_executor(None, self._checkpoint, "checkpoint")
            await asyncio.sleep(min(self._scan_s, self._checkpoint_s))

    def _probe(self) -> HostProbe:
        base = self._host or HostProbe()
        return replace(
            base,
            clock=lambda _state_dir: self.clock.state(),
            process=process_hardening(),
            mlock=str(memory_protection()["mlock"]),
            under_systemd=base.under_systemd or "NOTIFY_SOCKET" in os.environ,
        )

    def scan_now(self) -> ScanReport:
        report = run_scan(self._config(), self._probe())
        self.last = report
        shown = [f for f in report.findings if f.severity != "info"]
        for f in shown[:MAX_FINDING_EVENTS]:
            self._publish("posture-finding", f.to_json())
        self._publish("posture-scan", report.summary())
        _log.info("posture scan: worst %s, %s", report.worst, report.counts())
        return report

    def _checkpoint(self, source: str) -> None:
        try:
            self.clock.checkpoint(source)
        except OSError as exc:  # a full disk must not stop the service; the floor just stays lower
            _log.warning("time floor checkpoint not written: %s", exc)

    def health(self) -> dict[str, Any]:
        """The heartbeat's ``posture`` field: memory protection, the clock, the last scan's summary."""
        return {
            "memory": memory_protection(),
            "clock": self.clock.state().to_json(),
            "scan": None if self.last is None else self.last.summary(),
        }
