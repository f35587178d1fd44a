"""The integrity monitor: a signed baseline of the digests of the files that decide what the device does.

Watched: the installed ``edgeguard`` package, the config file, the trusted publisher keys, the revocation
list, the API tokens file, the hooks directory, and ``integrity.paths`` (the systemd unit file, say). The
baseline (``<state_dir>/integrity-baseline.json``: one SHA-256 per file, a missing file or a symbolic link
recorded as such) is taken at first start and signed with the device's Ed25519 key; every check (at start,
every ``interval_s`` in its own thread, at reload) compares the files with it.

What counts as a change that was meant: a reload (SIGHUP, ``POST /v1/admin/reload``) is the operator saying
"I changed the config, keys or tokens", so it re-takes the baseline of those (recorded as
``integrity-rebaseline`` with what changed); the runtime package is re-taken only when its version changed
(an upgrade). A baseline whose signature does not verify is itself an alert.

Work is bounded: at most ``max_files`` files per watched directory and ``max_file_bytes`` hashed per file
(streamed, 1 MiB at a time); files are opened without following links and without blocking on FIFOs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import AuditError
from edgeguard.keys import public_key_id

from ._config import IntegrityConfig
from ._record import canonical

__all__ = ["IntegrityMonitor", "IntegrityReport", "BASELINE_FILE"]

_log = logging.getLogger("edgeguard.integrity")
BASELINE_FILE = "integrity-baseline.json"
_MAX_BASELINE = 64 * 1024 * 1024
_SKIP_DIRS = frozenset({"__pycache__"})


@dataclass(frozen=True)
class IntegrityReport:
    state: str  # "ok" | "changed" | "baseline-taken" | "baseline-invalid"
    changed: tuple[str, ...] = ()  # "path: modified|missing|added|..."
    time: str = ""

    @property
    def alert(self) -> bool:
        return self.state in ("changed", "baseline-invalid")

    def reason(self) -> str:
        if self.state == "baseline-invalid":
            return "integrity: the signed baseline does not verify (replaced or corrupted)"
        shown = ", ".join(self.changed[:5])
        more = f" and {len(self.changed) - 5} more" if len(self.changed) > 5 else ""
        return f"integrity: {shown}{more}"


@dataclass
class _State:
    last: IntegrityReport | None = None
    last_alert: dict[str, Any] | None = None
    checks: int = 0
    problems: list[str] = field(default_factory=list)


class IntegrityMonitor:
    def __init__(
        self,
        *,
        config: IntegrityConfig,
        state_dir: Path,
        targets: dict[str, Path],
        package_dir: Path,
        version: str,
        signing_key: Ed25519PrivateKey,
        on_report: Callable[[IntegrityReport, IntegrityReport | None], None],
        now: Callable[[], datetime] | None = None,
    ) -> None:
        """``targets``: label -> file or directory. ``on_report(report, previous)`` is called after every
        check whose outcome differs from the previous one (from the checking thread)."""
        self.config = config
        self._path = state_dir / BASELINE_FILE
        self._targets = dict(targets)
        self._targets.setdefault("runtime", package_dir)
        self._package = str(package_dir)
        self._version = version
        self._key = signing_key
        self._on_report = on_report
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()  # one check at a time; the state
        self._state = _State()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------------------
    def check(self) -> IntegrityReport:
        with self._lock:
            current = self._digests()
            baseline = self._read_baseline()
            if baseline is None:
                self._write_baseline(current)
                report = IntegrityReport("baseline-taken", (), self._iso())
            elif isinstance(baseline, str):
                report = IntegrityReport("baseline-invalid", (), self._iso())
            else:
                version, digests = baseline
                if version != self._version:
                    # An upgrade: the runtime package is expected to differ; everything else must not.
                    digests = {k: v for k, v in digests.items() if not self._in_package(k)}
                    digests.update({k: v for k, v in current.items() if self._in_package(k)})
                    self._write_baseline(digests)
                changed = _compare(digests, current)
                report = IntegrityReport("changed" if changed else "ok", tuple(changed), self._iso())
            return self._publish(report)

    def rebaseline(self) -> list[str]:
        """The operator's reload: take the config, keys, tokens and hooks as they are now (the runtime
        package keeps its baseline). Returns what differed from the old baseline."""
        with self._lock:
            current = self._digests()
            baseline = self._read_baseline()
            old: dict[str, str] = baseline[1] if isinstance(baseline, tuple) else {}
            merged = {k: v for k, v in current.items() if not self._in_package(k)}
            package_old = {k: v for k, v in old.items() if self._in_package(k)}
            merged.update(package_old or {k: v for k, v in current.items() if self._in_package(k)})
            diff = _compare(old, merged) if old else []
            self._write_baseline(merged)
            changed = _compare(merged, current)
            self._publish(IntegrityReport("changed" if changed else "ok", tuple(changed), self._iso()))
            return diff

    def start(self) -> None:
        if self.config.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eg-integrity", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def health(self) -> dict[str, Any]:
        s = self._state
        last = s.last
        return {
            "state": "unknown" if last is None else ("ok" if not last.alert else last.state),
            "policy": self.config.policy,
            "changed": list(last.changed[:20]) if last is not None else [],
            "last_check": last.time if last is not None else None,
            "checks": s.checks,
            "last_alert": s.last_alert,
        }

    @property
    def alerting(self) -> IntegrityReport | None:
        last = self._state.last
        return last if last is not None and last.alert else None

    # -- internals -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.check()
            except Exception:  # a check that failed must not end the monitoring
                _log.exception("integrity check failed")

    def _publish(self, report: IntegrityReport) -> IntegrityReport:
        s = self._state
        previous = s.last
        s.checks += 1
        s.last = report
        if report.alert:
            s.last_alert = {"time": report.time, "reason": report.reason()}
        if previous is None or (previous.state, previous.changed) != (report.state, report.changed):
            try:
                self._on_report(report, previous)
            except Exception:
                _log.exception("integrity report handler failed")
        return report

    def _iso(self) -> str:
        return self._now().astimezone(timezone.utc).isoformat(timespec="seconds")

    def _in_package(self, key: str) -> bool:
        return key == self._package or key.startswith(self._package + "/")

    def _digests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for path in self._targets.values():
            _digest_into(out, path, self.config)
        return out

    def _read_baseline(self) -> tuple[str, dict[str, str]] | str | None:
        try:
            raw = read_checked(self._path, what="integrity baseline", limit=_MAX_BASELINE,
                               error=AuditError).data
        except AuditError as exc:
            if not self._path.exists() and not self._path.is_symlink():
                return None
            _log.error("%s", exc)
            return "invalid"
        try:
            doc = json.loads(raw)
            sig = bytes.fromhex(doc.pop("sig"))
            self._key.public_key().verify(sig, canonical(doc))
            digests = doc["digests"]
            version = doc["version"]
            if not isinstance(digests, dict) or not isinstance(version, str):
                return "invalid"
            return version, {str(k): str(v) for k, v in digests.items()}
        except (ValueError, KeyError, TypeError, AttributeError, InvalidSignature):
            return "invalid"

    def _write_baseline(self, digests: dict[str, str]) -> None:
        doc: dict[str, Any] = {"v": 1, "version": self._version, "time": self._iso(),
                               "key_id": public_key_id(self._key.public_key()), "digests": digests}
        doc["sig"] = self._key.sign(canonical(doc)).hex()
        atomic_write(self._path, canonical(doc) + b"\n", mode=0o600)


def _compare(baseline: dict[str, str], current: dict[str, str]) -> list[str]:
    out = []
    for key in sorted(set(baseline) | set(current)):
        old, new = baseline.get(key), current.get(key)
        if old == new:
            continue
        if old is None:
            out.append(f"{key}: added")
        elif new is None or new == "missing":
            out.append(f"{key}: missing")
        elif old == "missing":
            out.append(f"{key}: appeared")
        else:
            out.append(f"{key}: modified")
    return out


def _digest_into(out: dict[str, str], path: Path, cfg: IntegrityConfig) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        out[str(path)] = "missing"
        return
    except OSError as exc:
        out[str(path)] = f"unreadable: {exc.strerror}"
        return
    if stat.S_ISDIR(st.st_mode):
        n = 0
        for root, dirs, files in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")):
                    continue
                n += 1
                if n > cfg.max_files:
                    out[f"{path}/..."] = f"more than {cfg.max_files} files"
                    return
                full = Path(root) / name
                out[str(full)] = _file_digest(full, cfg.max_file_bytes)
        return
    out[str(path)] = _file_digest(path, cfg.max_file_bytes)


def _file_digest(path: Path, limit: int) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            try:
                return f"symlink:{os.readlink(path)}"
            except OSError:
                return "symlink"
        return f"unreadable: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({stat.S_IFMT(st.st_mode):o})"
        h = hashlib.sha256()
        left = limit
        while left > 0:
            chunk = os.read(fd, min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        suffix = "" if left > 0 or os.read(fd, 1) == b"" else f" (first {limit} bytes)"
        return f"sha256:{h.hexdigest()}{suffix} mode:{stat.S_IMODE(st.st_mode):o}"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    finally:
        os.close(fd)
