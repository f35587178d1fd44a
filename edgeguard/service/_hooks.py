"""Event hooks: every executable in the hooks directory runs on each event, with the event as JSON on stdin.

Typical hooks drive a status LED or a relay (see firmware_hooks/hooks.d/). Hooks run one after another in name
order, each with a timeout after which it is killed; a failing hook is logged and never affects the service.
Events: ``degraded``, ``recovered``, ``restart``, ``crash-loop``, ``safe-state-left``, ``bundle-rejected``,
``reloaded``, ``stopping``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["HookRunner", "EVENT_KINDS"]

_log = logging.getLogger("edgeguard.hooks")

EVENT_KINDS = (
    "degraded",
    "recovered",
    "restart",
    "crash-loop",
    "safe-state-left",
    "bundle-rejected",
    "reloaded",
    "stopping",
)


class HookRunner:
    def __init__(self, *, directory: Path | None, timeout_s: float, device_id: str) -> None:
        self.directory = directory
        self.timeout_s = timeout_s
        self.device_id = device_id
        self.runs = 0
        self.failures = 0
        self._lock = threading.Lock()

    def hooks(self) -> list[Path]:
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for p in sorted(self.directory.iterdir()):
            # Skip editor backups and disabled hooks; only regular executable files run.
            if p.name.startswith(".") or p.name.endswith("~") or not p.is_file() or not os.access(p, os.X_OK):
                continue
            found.append(p)
        return found

    def fire(
        self, kind: str, data: dict[str, Any] | None = None, *, wait: bool = False
    ) -> threading.Thread | None:
        """Run every hook for ``kind``; in a background thread unless ``wait``."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        hooks = self.hooks()
        if not hooks:
            return None
        event = {"event": kind, "device": self.device_id, "time": time.time(), **(data or {})}
        body = json.dumps(event, default=str).encode()
        if wait:
            self._run_all(hooks, kind, body)
            return None
        t = threading.Thread(
            target=self._run_all, args=(hooks, kind, body), name=f"eg-hook-{kind}", daemon=True
        )
        t.start()
        return t

    def _run_all(self, hooks: list[Path], kind: str, body: bytes) -> None:
        with self._lock:  # one event at a time, so an LED hook sees events in order
            for hook in hooks:
                self.runs += 1
                env = {**os.environ, "EDGEGUARD_EVENT": kind}
                try:
                    proc = subprocess.run(
                        [str(hook), kind],
                        input=body,
                        capture_output=True,
                        timeout=self.timeout_s,
                        env=env,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    self.failures += 1
                    _log.warning(
                        "hook %s timed out after %.1f s on %s (killed)", hook.name, self.timeout_s, kind
                    )
                    continue
                except OSError as exc:
                    self.failures += 1
                    _log.warning("hook %s could not run: %s", hook.name, exc)
                    continue
                if proc.returncode != 0:
                    self.failures += 1
                    tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                    _log.warning("hook %s exited %d on %s: %s", hook.name, proc.returncode, kind, tail[0])
