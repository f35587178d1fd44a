"""``edgeguard run``: build the watchdog chain from the config, run the supervisor (or the worker alone)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edgeguard.watchdog import DevWatchdog, McuWatchdog, SystemdNotifier, Watchdog, WatchdogChain

from ._hooks import HookRunner
from ._supervisor import Supervisor
from .config import ServiceConfig, load_config

__all__ = ["run_service", "build_chain"]


def build_chain(cfg: ServiceConfig) -> WatchdogChain:
    w = cfg.watchdog
    notifier = SystemdNotifier(environ=os.environ if w.systemd else {})
    dogs: list[Watchdog] = []
    if w.device is not None:
        nowayout = {"auto": None, "on": True, "off": False}[w.device_nowayout]
        dogs.append(DevWatchdog(path=w.device, timeout_s=w.device_timeout_s, nowayout=nowayout))
    if w.mcu_port is not None:
        dogs.append(McuWatchdog(port=w.mcu_port, baudrate=w.mcu_baudrate, timeout_s=w.mcu_timeout_s))
    return WatchdogChain(notifier=notifier, watchdogs=dogs)


def run_service(config_path: Path, *, supervise: bool = True) -> int:
    cfg = load_config(config_path)  # ConfigError here is exit code 2, before anything starts
    logging.basicConfig(
        level=os.environ.get("EDGEGUARD_LOG", "INFO"),
        stream=sys.stderr,
        format="edgeguard[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not supervise:
        # Imported only here: the supervisor process never loads the worker's stack (it spawns it).
        from ._worker import main as worker_main  # noqa: PLC0415

        return worker_main(["-c", str(cfg.path)])
    cfg.device.state_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(
        config_path=cfg.path,
        settings=cfg.service,
        state_path=cfg.supervisor_state_path,
        chain=build_chain(cfg),
        hooks=HookRunner(
            directory=cfg.service.hooks_dir, timeout_s=cfg.service.hook_timeout_s, device_id=cfg.device.id
        ),
        recovery_grace_s=cfg.watchdog.recovery_grace_s,
    )
    return sup.run()
