"""``edgeguard run``: check the whole config, then run the supervisor (or the worker alone)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ._supervisor_main import build_chain, handoff
from .config import load_config

__all__ = ["run_service", "build_chain"]


def run_service(config_path: Path, *, supervise: bool = True) -> int:  # execv: no return when supervising
    cfg = load_config(config_path)  # ConfigError here is exit code 2, before anything starts
    if not supervise:
        logging.basicConfig(
            level=os.environ.get("EDGEGUARD_LOG", "INFO"),
            stream=sys.stderr,
            format="edgeguard[%(process)d] %(levelname)s %(name)s: %(message)s",
        )
        # Imported only here: the supervisor process never loads the worker's stack (it spawns it).
        from ._worker import main as worker_main  # noqa: PLC0415

        return worker_main(["-c", str(cfg.path)])
    # This process has loaded the whole config stack to check the file; the supervisor needs none of it.
    # execv keeps the pid (systemd's MainPID, $NOTIFY_SOCKET) and drops every module loaded so far.
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "edgeguard.service._supervisor_main", "--settings", handoff(cfg)]
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter and argv, no shell involved
