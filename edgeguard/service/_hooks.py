"""Event hooks: every executable in the hooks directory runs on each event, with the event as JSON on stdin.

Typical hooks drive a status LED or a relay (see firmware_hooks/hooks.d/). Hooks run one after another in name
order, each with a timeout after which it is killed; a failing hook is logged and never affects the service.
Events: ``degraded``, ``recovered``, ``restart``, ``crash-loop``, ``safe-state-left``, ``bundle-rejected``,
``reloaded``, ``stopping``, ``integrity-alert``.

A hook runs with the service's rights, so it is refused (logged, counted in ``refused``) unless ssh would
accept it as an ``authorized_keys`` file: the directory and the hook are owned by root or the service user and
are not writable by group or others, and the hook is a regular file (a symbolic link is not followed).
A hook gets a minimal environment (:func:`hook_environment`): never the service's credentials directory or
its systemd sockets.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["HookRunner", "EVENT_KINDS", "hook_environment"]

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
    "command-accepted",
    "command-refused",
    "integrity-alert",
)


# What a hook needs to find its tools; not the service's PATH, which may name a directory others can write.
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Passed through when the service has them: locale and time zone only.
_PASS_THROUGH = ("LANG", "LC_ALL", "TZ")


def hook_environment(kind: str, device_id: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A hook's whole environment: PATH, the locale, ``EDGEGUARD_*`` settings the operator gave the service
    (``EDGEGUARD_LED`` for the status-LED hook), ``EDGEGUARD_EVENT`` and ``EDGEGUARD_DEVICE``. Nothing else:
    ``CREDENTIALS_DIRECTORY`` (the device key, the tokens), ``NOTIFY_SOCKET`` (a hook could report READY or
    kick the watchdog in the service's name) and ``WATCHDOG_*`` never reach a hook."""
    src = dict(os.environ) if environ is None else environ
    env = {k: v for k, v in src.items() if k in _PASS_THROUGH or k.startswith("EDGEGUARD_")}
    env.update(PATH=HOOK_PATH, EDGEGUARD_EVENT=kind, EDGEGUARD_DEVICE=device_id)
    return env


def _unsafe(st: os.stat_result, *, directory: bool) -> str | None:
    """Why ssh would refuse this file or directory, or None: owned by neither root nor us, or writable by
    group/others."""
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid} (must be root or the service user)"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"mode {stat.S_IMODE(st.st_mode):04o} is writable by group/others (run: chmod go-w)"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "a symbolic link (not followed)" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    return None


class HookRunner:
    def __init__(self, *, directory: Path | None, timeout_s: float, device_id: str) -> None:
        self.directory = directory
        self.timeout_s = timeout_s
        self.device_id = device_id
        self.runs = 0
        self.failures = 0
        self.refused = 0  # hooks (or a whole directory) not run because their owner or mode is unsafe
        self._lock = threading.Lock()

    def hooks(self) -> list[Path]:
        """The hooks that may run now, in name order; unsafe ones are logged and counted, never run."""
        d = self.directory
        if d is None:
            return []
        try:
            dst = os.stat(d)
        except OSError:
            return []
        if not stat.S_ISDIR(dst.st_mode):
            return []
        why = _unsafe(dst, directory=True)
        if why is not None:
            self.refused += 1
            _log.warning("hooks directory %s refused: %s", d, why)
            return []
        found = []
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            # Skip editor backups and disabled (not executable) hooks silently; refuse unsafe ones loudly.
            if e.name.startswith(".") or e.name.endswith("~"):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            why = _unsafe(st, directory=False)
            if why is not None:
                self.refused += 1
                _log.warning("hook %s refused: %s", e.name, why)
                continue
            if not os.access(d / e.name, os.X_OK):
                continue
            found.append(d / e.name)
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
                env = hook_environment(kind, self.device_id)
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
