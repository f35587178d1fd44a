"""The supervisor process's entry point: ``python -m edgeguard.service._supervisor_main --settings JSON``.

``edgeguard run`` reads and checks the whole config (exit code 2 on a bad one, before anything starts), then
replaces itself (``execv``: same pid, so systemd's MainPID and ``$NOTIFY_SOCKET`` stay valid) with this lean
process, handing over only what the supervisor uses: the ``[service]`` and ``[watchdog]`` sections, the
device id and state directory, the config path. The supervisor only spawns and watches the worker, so it
imports the standard library, the watchdog package and the small modules below; never the worker's stack
(numpy, onnxruntime, aiohttp, paho: tens of MiB on a 512 MiB board). tests/service/test_footprint.py checks
its ``sys.modules``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeguard.watchdog import DevWatchdog, McuWatchdog, SystemdNotifier, Watchdog, WatchdogChain

from ._hooks import HookRunner
from ._settings import SupervisorSection, WatchdogSection
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from .config import ServiceConfig

__all__ = ["build_chain", "handoff", "main", "MODULES_ENV"]

# Test seam: when set, the supervisor writes its sys.modules there once its worker is ready (what it loaded
# while running, not at import). paho is pure Python, so /proc/PID/maps alone could not show it.
MODULES_ENV = "EDGEGUARD_DEBUG_SUPERVISOR_MODULES"


def build_chain(w: WatchdogSection) -> WatchdogChain:
    notifier = SystemdNotifier(environ=os.environ if w.systemd else {})
    dogs: list[Watchdog] = []
    if w.device is not None:
        nowayout = {"auto": None, "on": True, "off": False}[w.device_nowayout]
        dogs.append(DevWatchdog(path=w.device, timeout_s=w.device_timeout_s, nowayout=nowayout))
    if w.mcu_port is not None:
        dogs.append(McuWatchdog(port=w.mcu_port, baudrate=w.mcu_baudrate, timeout_s=w.mcu_timeout_s))
    return WatchdogChain(notifier=notifier, watchdogs=dogs)


def _plain(section: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(section).items()}


def handoff(cfg: ServiceConfig) -> str:
    """What the supervisor needs from a checked config, as one JSON argument (paths and numbers only)."""
    return json.dumps(
        {
            "config": str(cfg.path),
            "device_id": cfg.device.id,
            "state_dir": str(cfg.device.state_dir),
            "service": _plain(cfg.service),
            "watchdog": _plain(cfg.watchdog),
        }
    )


def _section(cls: type[Any], doc: dict[str, Any], paths: tuple[str, ...]) -> Any:
    return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in doc.items()})


def _write_modules(path: Path) -> None:
    path.write_text("\n".join(sorted(sys.modules)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgeguard-supervisor")
    ap.add_argument("--settings", required=True, help="JSON from handoff() (edgeguard run passes it)")
    args = ap.parse_args(argv)
    doc = json.loads(args.settings)
    settings: SupervisorSection = _section(SupervisorSection, doc["service"], ("hooks_dir",))
    watchdog: WatchdogSection = _section(WatchdogSection, doc["watchdog"], ("device",))
    state_dir = Path(doc["state_dir"])
    logging.basicConfig(
        level=os.environ.get("EDGEGUARD_LOG", "INFO"),
        stream=sys.stderr,
        format="edgeguard[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    modules_file = os.environ.pop(MODULES_ENV, None)  # not inherited by the worker
    sup = Supervisor(
        config_path=Path(doc["config"]),
        settings=settings,
        state_path=state_dir / "supervisor.json",
        chain=build_chain(watchdog),
        hooks=HookRunner(directory=settings.hooks_dir, timeout_s=settings.hook_timeout_s,
                         device_id=str(doc["device_id"])),
        recovery_grace_s=watchdog.recovery_grace_s,
        on_ready=partial(_write_modules, Path(modules_file)) if modules_file else None,
    )
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
