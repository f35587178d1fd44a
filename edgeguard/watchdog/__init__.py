"""Watchdogs: systemd notify, the Linux watchdog device, and an external microcontroller over serial."""

from __future__ import annotations

from ._chain import Watchdog, WatchdogChain
from ._devwatchdog import DevWatchdog
from ._mcu import McuStatus, McuWatchdog
from ._systemd import SystemdNotifier

__all__ = ["Watchdog", "WatchdogChain", "DevWatchdog", "McuWatchdog", "McuStatus", "SystemdNotifier"]
