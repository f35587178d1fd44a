"""The supervisor's and the watchdogs' config sections (``[service]``, ``[watchdog]``; docs/service.md).

Standard library only: the supervisor process imports these without the worker's stack (numpy, onnxruntime,
aiohttp, paho), which :mod:`edgeguard.service.config` pulls in for the other sections. ``config`` re-exports
both classes; the checks here are the ones that module runs while reading the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeguard.errors import ConfigError

__all__ = ["SupervisorSection", "WatchdogSection"]


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _seconds(v: float, key: str, lo: float, hi: float) -> None:
    _check(math.isfinite(v) and lo <= v <= hi, key, f"must be {lo}..{hi} s")


@dataclass(frozen=True, kw_only=True)
class SupervisorSection:
    liveness_s: float = 1.0  # worker -> supervisor liveness period
    hang_timeout_s: float = 10.0  # no liveness for this long => the worker is hung and is killed
    start_timeout_s: float = 120.0  # verifying + self-testing a model may take a while on a small board
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    crash_loop_restarts: int = 5  # this many restarts ...
    crash_loop_window_s: float = 300.0  # ... within this window => safe state
    stop_timeout_s: float = 20.0
    hooks_dir: Path | None = None
    hook_timeout_s: float = 10.0
    fault_injection: bool = False  # enables POST /v1/admin/fault (tests and bench only)
    # A pre-started worker with the model loaded (and self-tested) that takes over at once when the serving
    # one fails; costs a second worker's memory (docs/footprint.md).
    spare_worker: bool = False

    def __post_init__(self) -> None:
        _seconds(self.liveness_s, "service.liveness_s", 0.05, 60)
        _seconds(self.hang_timeout_s, "service.hang_timeout_s", 0.2, 3600)
        _check(
            self.hang_timeout_s >= 2 * self.liveness_s, "service.hang_timeout_s", "must be >= 2 x liveness_s"
        )
        _seconds(self.start_timeout_s, "service.start_timeout_s", 1, 3600)
        _seconds(self.backoff_initial_s, "service.backoff_initial_s", 0.01, 600)
        _seconds(self.backoff_max_s, "service.backoff_max_s", self.backoff_initial_s, 3600)
        _check(1 <= self.crash_loop_restarts <= 1000, "service.crash_loop_restarts", "must be 1..1000")
        _seconds(self.crash_loop_window_s, "service.crash_loop_window_s", 1, 86400)
        _seconds(self.stop_timeout_s, "service.stop_timeout_s", 0.5, 600)
        _seconds(self.hook_timeout_s, "service.hook_timeout_s", 0.1, 600)


@dataclass(frozen=True, kw_only=True)
class WatchdogSection:
    systemd: bool = True  # use $NOTIFY_SOCKET / $WATCHDOG_USEC when systemd sets them
    device: Path | None = None  # e.g. /dev/watchdog
    device_timeout_s: int = 30
    device_nowayout: Literal["auto", "on", "off"] = "auto"
    mcu_port: str | None = None  # e.g. /dev/ttyACM0
    mcu_baudrate: int = 115200
    mcu_timeout_s: float = 30.0
    recovery_grace_s: float = (
        60.0  # keep kicking this long while the worker restarts; then let the board reset
    )

    def __post_init__(self) -> None:
        _check(1 <= self.device_timeout_s <= 3600, "watchdog.device_timeout_s", "must be 1..3600")
        _seconds(self.mcu_timeout_s, "watchdog.mcu_timeout_s", 1, 3600)
        _seconds(self.recovery_grace_s, "watchdog.recovery_grace_s", 0, 86400)
