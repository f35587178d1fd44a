"""The supervisor: runs the worker as a child process, restarts it on crash or hang, detects crash loops.

Liveness: the worker writes one JSON line per ``liveness_s`` to an inherited pipe, from its event loop, so a
blocked loop and a stalled inference (reported by the worker) both read as a hang. The supervisor kills a hung
worker with SIGKILL (a hung process may not honour SIGTERM) and starts a new one after an exponential backoff.
``crash_loop_restarts`` failures within ``crash_loop_window_s`` put the device in the safe state: the worker
runs in ``safe`` mode (no model, no sources; link and heartbeat only, so the device keeps reporting) until
SIGHUP or a restart of the service. Watchdogs are kicked only while the verdict is healthy (see
:meth:`_verdict`).

A serving worker's first failure is replaced at once; the backoff starts with the second failure in a row.
With ``spare_worker`` a second worker is started once the first is ready: it loads and self-tests the model,
says ``spare-ready`` and waits on its stdin; when the serving worker fails it gets ``takeover`` and only has
to open the outbox, the link and the sources (docs/service.md, "Spare worker").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from edgeguard.watchdog import WatchdogChain

from ._hooks import HookRunner
from ._settings import SupervisorSection
from ._state import Failure, SupervisorState, read_state, write_state

__all__ = ["Supervisor", "WorkerMode", "default_worker_argv"]

_log = logging.getLogger("edgeguard.supervisor")

WorkerMode = Literal["serve", "safe", "spare"]
MAX_LINE = 64 * 1024


def default_worker_argv(config_path: Path, mode: WorkerMode, liveness_fd: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgeguard.service._worker_main",
        "-c",
        str(config_path),
        "--mode",
        mode,
        "--liveness-fd",
        str(liveness_fd),
    ]


@dataclass
class _Spare:
    """A pre-started worker (``spare_worker``): model loaded, waiting on its stdin for ``takeover``."""

    proc: subprocess.Popen[bytes]
    fd: int
    buf: bytes = b""
    ready: bool = False


@dataclass
class _Outcome:
    stopped: bool
    reason: str = ""
    broken_at: float = 0.0  # monotonic time the worker stopped being useful


class Supervisor:
    def __init__(
        self,
        *,
        config_path: Path,
        settings: SupervisorSection,
        state_path: Path,
        chain: WatchdogChain,
        hooks: HookRunner,
        recovery_grace_s: float,
        worker_argv: Callable[[Path, WorkerMode, int], Sequence[str]] = default_worker_argv,
        env: dict[str, str] | None = None,
        handle_signals: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self._on_first_ready = on_ready  # called once, when the first worker is ready (a test seam)
        self.s = settings
        self.state_path = state_path
        self.chain = chain
        self.hooks = hooks
        self.grace = recovery_grace_s
        self._argv = worker_argv
        self._env = env
        self._handle_signals = handle_signals
        self._clock = clock
        self._wall = wall
        self.state = SupervisorState()
        self.mode: WorkerMode = "serve"
        self._stop = False
        self._reload = False
        self._consecutive = 0
        self._failed_serving = False  # the last failed worker had been ready (serving) before it failed
        self._spare: _Spare | None = None
        self._spare_failures = 0  # spares that exited in a row; after 3 no new one is started (log says so)
        self._recovery_since: float | None = None  # set while no worker is ready
        self._run_started = 0.0  # wall clock of this run's start: the crash-loop window begins no earlier
        self._pending_repair: Failure | None = None
        self._pending_events: list[dict[str, Any]] = []
        self._ready_at: float | None = None
        self._starting_since: float | None = None  # a worker process started and not yet ready
        self._alive: dict[str, Any] = {}
        self._last_alive = 0.0
        self._announced_ready = False
        self._restart_requested: str | None = None  # a clean restart the worker asked for
        self._status = ""
        self._status_at = -1e9
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # -- signals
    # -----------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def request_reload(self) -> None:
        self._reload = True
        self.request_stop_wakeup()

    def request_stop_wakeup(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def request_stop(self) -> None:
        self._stop = True
        self.request_stop_wakeup()

    # -- main loop
    # ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        if self._handle_signals:  # only possible in the main thread (tests drive request_stop instead)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.state = read_state(self.state_path)
        if not self.state.first_start:
            self.state.first_start = self._wall()
        self.state.safe_state, self.state.safe_reason = False, None  # a fresh service start tries to serve
        self._run_started = self._wall()
        self.state.watchdogs = self.chain.kinds
        self.chain.open()
        self._recovery_since = self._clock()
        try:
            while not self._stop:
                outcome = self._run_worker()
                if outcome.stopped:
                    break
                self._after_failure(outcome)
                self._backoff()
        finally:
            self._drop_spare()
            self.chain.notifier.stopping("stopping")
            self.chain.close(clean=True)
            self._save()
            if self._handle_signals:
                signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0

    def _save(self) -> None:
        try:
            write_state(self.state_path, self.state)
        except OSError as exc:
            _log.warning("cannot write %s: %s", self.state_path, exc)

    def _spawn(self, mode: WorkerMode | None = None) -> tuple[subprocess.Popen[bytes], int]:
        mode = mode or self.mode
        r, w = os.pipe()
        argv = list(self._argv(self.config_path, mode, w))
        proc = subprocess.Popen(
            argv, pass_fds=(w,), stdin=subprocess.PIPE, env=self._env, start_new_session=False
        )
        os.close(w)
        os.set_blocking(r, False)
        if proc.stdin is not None:  # a hung worker must never block the supervisor on a full pipe
            os.set_blocking(proc.stdin.fileno(), False)
        if mode != "spare":  # a spare counts as a start when it takes over
            self.state.starts += 1
            self._save()
        _log.info("worker %d started (%s mode)", proc.pid, mode)
        return proc, r

    def _run_worker(self) -> _Outcome:
        spare = self._take_spare()
        if spare is not None:
            proc, fd = spare.proc, spare.fd
            self._send(proc, {"t": "takeover"})
            self.state.starts += 1
            self._save()
            _log.info("spare worker %d takes over", proc.pid)
        else:
            proc, fd = self._spawn()
        started = self._clock()
        self._reset_worker_view(started)
        self._starting_since = started
        buf = b""
        try:
            while True:
                spare_fds = [self._spare.fd] if self._spare is not None else []
                ready, _, _ = select.select([fd, self._wake_r, *spare_fds], [], [], 0.1)
                if self._wake_r in ready:
                    _drain(self._wake_r)
                self._watch_spare(ready)
                if fd in ready:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        chunk = b""
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    if len(buf) > MAX_LINE:  # a worker that writes garbage is treated as hung below
                        buf = b""
                    for line in lines:
                        self._on_line(line, proc)
                now = self._clock()
                if self._stop:
                    self._stop_worker(proc)
                    return _Outcome(stopped=True)
                if self._reload:
                    self._reload = False
                    self._drop_spare()  # it holds the bundle and config of before the reload
                    if self.mode == "safe":
                        self._leave_safe_state(proc)
                        return _Outcome(stopped=False, reason="", broken_at=now)
                    proc.send_signal(signal.SIGHUP)
                if self._restart_requested is not None:
                    _log.info("restarting the worker: %s", self._restart_requested)
                    self._restart_requested = None
                    self._stop_worker(proc)
                    return _Outcome(stopped=False, reason="", broken_at=now)  # "" = not a failure
                rc = proc.poll()
                if rc is not None:
                    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                    return _Outcome(stopped=False, reason=f"crash: {how}", broken_at=now)
                if self._ready_at is None and now - started > self.s.start_timeout_s:
                    _kill(proc)
                    return _Outcome(
                        False, f"start timeout: not ready after {self.s.start_timeout_s:g} s", now
                    )
                if self._ready_at is not None and now - self._last_alive > self.s.hang_timeout_s:
                    _kill(proc)
                    return _Outcome(
                        False, f"hang: no liveness for {now - self._last_alive:.1f} s", self._last_alive
                    )
                if self._alive.get("stalled"):
                    _kill(proc)
                    return _Outcome(
                        False,
                        f"hang: {self._alive.get('reason') or 'inference stalled'}",
                        self._last_alive - self.s.hang_timeout_s,
                    )
                if self._ready_at is not None and now - self._ready_at > self.s.backoff_max_s:
                    self._consecutive = 0  # stable long enough: the next failure starts the backoff afresh
                self._keep_spare()
                self._tick(now)
        finally:
            os.close(fd)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

    def _reset_worker_view(self, now: float) -> None:
        self._starting_since = None
        self._ready_at = None
        self._alive = {}
        self._last_alive = now

    def _on_line(self, line: bytes, proc: subprocess.Popen[bytes]) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        now = self._clock()
        kind = msg.get("t")
        if kind == "ready":
            self._ready_at = self._last_alive = now
            self._alive = {"healthy": True}
            self._on_ready(msg, proc)
        elif kind == "alive":
            self._last_alive = now
            self._alive = msg
        elif kind == "restart":  # asked for by the worker itself (a remote `restart` command)
            self._restart_requested = str(msg.get("reason") or "requested")[:200]
        elif kind == "model-changed":  # a deploy switched or rolled back: a spare holds the model of before
            self._drop_spare()

    def _on_ready(self, msg: dict[str, Any], proc: subprocess.Popen[bytes]) -> None:
        assert self._ready_at is not None
        if self._pending_repair is not None and self._recovery_since is not None:
            self._pending_repair.mttr_s = round(self._ready_at - self._recovery_since, 3)
            self.state.repair_s += self._pending_repair.mttr_s
            self.state.repaired += 1
            self._pending_repair = None
        self._recovery_since = None
        self._save()
        status = str(
            msg.get("status") or ("safe state: reporting only" if self.mode == "safe" else "serving")
        )
        if not self._announced_ready:
            # READY=1 only once the model is verified and self-tested (the worker says ready only then).
            self.chain.notifier.ready(status)
            self._announced_ready = True
            if self._on_first_ready is not None:
                self._on_first_ready()
        self._set_status(status, force=True)
        for event in self._pending_events:
            self._send(proc, event)
        self._pending_events.clear()

    def _send(self, proc: subprocess.Popen[bytes], msg: dict[str, Any]) -> None:
        stdin: IO[bytes] | None = proc.stdin
        if stdin is None:
            return
        try:
            stdin.write(json.dumps(msg).encode() + b"\n")
            stdin.flush()
        except OSError:
            pass

    def _set_status(self, text: str, *, force: bool = False) -> None:
        """STATUS= for `systemctl status`: routine changes at most every 5 s, state changes at once."""
        now = self._clock()
        if text != self._status and (force or now - self._status_at >= 5.0):
            self._status, self._status_at = text, now
            self.chain.notifier.status(text)

    # -- watchdog verdict
    # ---------------------------------------------------------------------------------------
    def _verdict(self, now: float) -> tuple[bool, str]:
        if self._ready_at is None:
            since = self._recovery_since if self._recovery_since is not None else now
            if now - since <= self.grace:
                return True, ""  # restarting within the grace period: the supervisor is handling it
            starting = self._starting_since
            if starting is not None and now - starting <= self.s.start_timeout_s:
                return (
                    True,
                    "",
                )  # a worker is verifying and self-testing its model (bounded by start_timeout_s)
            return False, f"worker not ready for {now - since:.0f} s"
        if now - self._last_alive > self.s.hang_timeout_s:
            return False, "worker liveness missing"
        if not self._alive.get("healthy", False):
            return False, str(self._alive.get("reason") or "health check failed")
        return True, ""

    def _tick(self, now: float) -> None:
        healthy, reason = self._verdict(now)
        self.chain.tick(healthy=healthy, reason=reason)
        if self._ready_at is not None:
            status = self._alive.get("status")
            if isinstance(status, str) and status:
                degraded = self._alive.get("degraded")
                if healthy and degraded:
                    self._set_status(
                        f"DEGRADED: {degraded} | {status}", force=not self._status.startswith("DEGRADED")
                    )
                elif healthy:
                    self._set_status(status, force=self._status.startswith(("UNHEALTHY", "DEGRADED")))
                else:
                    self._set_status(
                        f"UNHEALTHY: {reason} | {status}", force=not self._status.startswith("UNHEALTHY")
                    )

    # -- failures, backoff, safe state
    # -------------------------------------------------------------------------
    def _after_failure(self, outcome: _Outcome) -> None:
        now = self._clock()
        if not outcome.reason:  # the safe state was left on purpose: not a failure
            self._recovery_since = now
            return
        if self._ready_at is not None:
            self.state.up_s += max(0.0, outcome.broken_at - self._ready_at)
        self._failed_serving = self._ready_at is not None
        failure = self.state.record_failure(at=self._wall(), reason=outcome.reason)
        self._pending_repair = failure
        self._recovery_since = outcome.broken_at if self._recovery_since is None else self._recovery_since
        self._consecutive += 1
        _log.warning("worker failed: %s", outcome.reason)
        event = {"reason": outcome.reason, "restarts": self.state.starts, "mode": self.mode}
        self.hooks.fire("restart", event)
        self._pending_events.append({"t": "event", "kind": "restart", "data": event})
        # Only this run's failures count: those an earlier, separate run left in the state file (say, a crash
        # loop on a config fixed since) stay in the record for MTBF but must not put a fresh start straight
        # into the safe state.
        window_start = max(self._wall() - self.s.crash_loop_window_s, self._run_started)
        recent = [f for f in self.state.history if f.at >= window_start]
        if self.mode == "serve" and len(recent) >= self.s.crash_loop_restarts:
            self.mode = "safe"
            self.state.safe_state = True
            self.state.safe_reason = (
                f"{len(recent)} failures within {self.s.crash_loop_window_s:g} s; last: {outcome.reason}"
            )
            _log.error("crash loop: entering the safe state (%s)", self.state.safe_reason)
            self._drop_spare()
            data = {"reason": self.state.safe_reason}
            self.hooks.fire("crash-loop", data)
            self._pending_events.append({"t": "event", "kind": "crash-loop", "data": data})
            self._set_status(f"SAFE STATE: {self.state.safe_reason}", force=True)
        self._save()

    def _leave_safe_state(self, proc: subprocess.Popen[bytes]) -> None:
        self._stop_worker(proc)
        self._resume_serving()

    def _resume_serving(self) -> None:
        """SIGHUP in the safe state (with a reporting worker or during a backoff): try to serve again."""
        _log.info("SIGHUP in the safe state: trying to serve again")
        self.mode = "serve"
        self.state.safe_state, self.state.safe_reason = False, None
        # Failures before this point no longer count towards the next crash loop.
        cutoff = self._wall()
        for f in self.state.history:
            f.at = min(f.at, cutoff - self.s.crash_loop_window_s - 1)
        self._consecutive = 0
        self.hooks.fire("safe-state-left", {})
        self._save()

    def _backoff(self) -> None:
        if self._stop or self._consecutive == 0:
            return
        if self._consecutive == 1 and self._failed_serving:
            # A worker that was serving failed: replace it at once (every second here is an outage). The
            # backoff protects against a crash loop, which starts with the second failure in a row.
            return
        delay = min(self.s.backoff_max_s, self.s.backoff_initial_s * 2 ** (self._consecutive - 1))
        _log.info("restarting the worker in %.2f s", delay)
        end = self._clock() + delay
        self._reset_worker_view(self._clock())
        while not self._stop and not self._reload:
            now = self._clock()
            if now >= end:
                break
            ready, _, _ = select.select([self._wake_r], [], [], min(0.1, end - now))
            if ready:
                _drain(self._wake_r)
            self._tick(self._clock())
        if self._reload and self.mode == "safe":
            self._reload = False
            self._resume_serving()

    # -- the spare worker
    # ----------------------------------------------------------------------------------------------
    def _keep_spare(self) -> None:
        """Start a spare once the serving worker is ready (not before: both would load the model at once)."""
        if (
            not self.s.spare_worker
            or self._spare is not None
            or self.mode != "serve"
            or self._ready_at is None
            or self._stop
        ):
            return
        if self._spare_failures >= 3:
            return
        proc, fd = self._spawn("spare")
        self._spare = _Spare(proc=proc, fd=fd)

    def _watch_spare(self, readable: Sequence[int]) -> None:
        spare = self._spare
        if spare is None:
            return
        if spare.fd in readable:
            try:
                chunk = os.read(spare.fd, 4096)
            except BlockingIOError:
                chunk = b""
            spare.buf += chunk
            *lines, spare.buf = spare.buf.split(b"\n")
            spare.buf = spare.buf[-MAX_LINE:]
            if any(b'"spare-ready"' in line for line in lines) and not spare.ready:
                spare.ready = True
                self._spare_failures = 0
                _log.info("spare worker %d ready to take over", spare.proc.pid)
        rc = spare.proc.poll()
        if rc is not None:
            self._spare = None
            os.close(spare.fd)
            self._spare_failures += 1
            _log.warning("spare worker %d exited (code %s)%s", spare.proc.pid, rc,
                         "; no further spare is started" if self._spare_failures >= 3 else "")

    def _take_spare(self) -> _Spare | None:
        """The spare, to serve now: also one still loading, which has a head start on a fresh worker."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if self.mode == "serve" and spare.proc.poll() is None:
            return spare
        self._spare = spare
        self._drop_spare()
        return None

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is None:
            return
        os.close(spare.fd)
        if spare.proc.stdin is not None:
            with contextlib.suppress(OSError):
                spare.proc.stdin.close()
        if spare.proc.poll() is None:
            with contextlib.suppress(OSError):
                spare.proc.terminate()  # it runs no handlers yet: loading or waiting for the takeover
            try:
                spare.proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(spare.proc)

    def _stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """Graceful stop: SIGTERM (stop accepting, finish in-flight work, flush), then SIGKILL."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            end = self._clock() + self.s.stop_timeout_s
            while proc.poll() is None and self._clock() < end:
                self.chain.tick(healthy=True)  # stopping on purpose: keep the watchdogs fed meanwhile
                time.sleep(0.05)
            if proc.poll() is None:
                _log.warning("worker did not stop within %.1f s; killing it", self.s.stop_timeout_s)
                _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        _log.error("worker %d survived SIGKILL for 10 s", proc.pid)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
