"""The worker process: sources -> pipeline (engine + outbox) -> MQTT link, reporting liveness to the
supervisor.

Run by the supervisor as ``python -m edgeguard.service._worker_main -c CONFIG --mode serve|safe|spare
--liveness-fd N`` (``spare``: load the model, then wait for ``takeover`` on stdin; docs/service.md).
Liveness lines are written from the event loop, so a blocked loop stops them; they never wait for an
inference. A stalled inference is reported explicitly, judged by its own bound (:meth:`Worker.stall_bound_s`).
SIGTERM: stop accepting, finish in-flight work, flush the outbox, publish the offline status.
SIGHUP: re-read the config, rebuild the trust store from the key files, reload API tokens and the bundle
(verified like any bundle) without dropping requests.

A serving model stops serving (state "no-model", API 503 with the reason, event ``bundle-rejected``) when a
reload finds its signer revoked or no longer trusted, and when it passes its ``not_after`` (checked on every
liveness tick against the injected wall clock, so expiry does not wait for a reload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import edgeguard
from edgeguard._hardening import harden_process
from edgeguard.audit import AuditLog, IntegrityMonitor, IntegrityReport
from edgeguard.clock import TrustedClock
from edgeguard.commands import CommandService
from edgeguard.errors import BundleRejected, ConfigError, EdgeGuardError
from edgeguard.keys import TrustStore
from edgeguard.link import MqttLink
from edgeguard.outbox import Outbox
from edgeguard.posture import PostureMonitor

from ._command_wiring import answer_key, build_commands, load_operators
from ._deploy_wiring import WorkerDeployHost, build_deploy
from ._faults import FaultInjector
from ._hooks import HookRunner
from ._loader import load_engine, load_keys, load_tokens, serving_problem
from ._pipeline import EngineLike, Pipeline
from ._state import read_state
from ._sysinfo import system_facts
from ._wiring import build_sources
from .config import ServiceConfig, load_config

__all__ = ["main", "Worker"]

_log = logging.getLogger("edgeguard.worker")

# A stuck inference is one running longer than this many times the slowest run measured on this device (see
# Worker.stall_bound_s and docs/service.md): wide enough for a throttled CPU and a busy board, tight enough to
# recover a wedged accelerator call within seconds of a normal run.
STALL_FACTOR = 5.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _unreadable(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"bundle file not found: {path}"
    return f"cannot read bundle {path}: {exc.strerror or type(exc).__name__}"


class Worker:
    def __init__(
        self,
        *,
        config: ServiceConfig,
        mode: str,
        liveness_fd: int,
        clock: TrustedClock | None = None,
        now: Callable[[], datetime] | None = None,
        engine: EngineLike | None = None,
    ) -> None:
        self.cfg = config
        self._preloaded = engine  # a spare's engine, loaded and self-tested before it took over
        self.mode = mode
        self._fd = liveness_fd
        self._started = time.monotonic()
        self.hooks = HookRunner(
            directory=config.service.hooks_dir,
            timeout_s=config.service.hook_timeout_s,
            device_id=config.device.id,
        )
        config.device.state_dir.mkdir(parents=True, exist_ok=True)
        # Every time-dependent check asks this clock (never earlier than the persisted floor); injectable.
        self.clock = clock or TrustedClock(state_dir=config.device.state_dir)
        self._now = now or self.clock.now  # expiry (bundle not_after) is judged on this; tests pass their own
        self.trust, self.device_key, storage_key = load_keys(config)
        self.outbox = Outbox(
            path=config.outbox_path, storage_key=storage_key, device_id=config.device.id, config=config.outbox
        )
        self.pipeline = Pipeline(engine=None, store=self.outbox)
        # -- audit trail and integrity monitor (edgeguard/audit; docs/security.md) --
        # The device's one signing key (audit checkpoints, integrity baseline, command answers):
        # device.signing_key, or <state_dir>/device-sign.key made at the first start.
        self.signing_key = answer_key(config)
        self.audit: AuditLog | None = (
            AuditLog(
                directory=config.device.state_dir / "audit",
                signing_key=self.signing_key,
                device_id=config.device.id,
                config=config.audit,
                publish=self._publish_checkpoint,
            )
            if config.audit.enabled
            else None
        )
        self.integrity: IntegrityMonitor | None = self._integrity_monitor(config)
        self.integrity_block: str | None = None  # why the refuse policy stops serving, if it does
        self.link = MqttLink(
            config=config.link,
            fleet=config.device.fleet,
            device_id=config.device.id,
            outbox=self.outbox,
            health=self.health,
            on_event=self.audit.event if self.audit is not None else None,  # every event passes the audit
        )
        self.pipeline.on_event = self.link.publish_event  # adversarial-input refusals: events, audited
        self.posture = PostureMonitor(
            config=lambda: self.cfg, clock=self.clock, publish=self.link.publish_event
        )
        self.faults = FaultInjector(enabled=config.service.fault_injection, pipeline=self.pipeline)
        self.sources: list[Any] = []
        self.api: Any = None
        self.model_error: str | None = None
        self._degraded: bool | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reloads = 0
        self._stopping_model: Any = None  # the engine the expiry timer is unloading (at most one at a time)
        self._commands: CommandService | None = None  # signed remote commands on `cmd` ([commands] enabled)
        # Remote deploy (edgeguard/deploy): A/B slots, probation; the slot record decides which bundle loads.
        self.deploy = build_deploy(config, now=lambda: self._now().timestamp())
        self.pipeline.observer = self.deploy.observe
        self._link_start: asyncio.Future[Any] | None = None  # link.start() running in the executor

    # -- health
    # ------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        engine = self.pipeline.engine
        doc: dict[str, Any] = (
            dict(engine.health())
            if engine is not None
            else {
                "model": None,
                "backend": None,
                "accelerator": None,
                "degraded": True,
                "degraded_reason": self.model_error or "safe state: not serving",
            }
        )
        doc["pid"] = os.getpid()
        doc["state"] = "safe" if self.mode == "safe" else ("serving" if engine is not None else "no-model")
        doc["supervisor"] = read_state(self.cfg.supervisor_state_path).heartbeat_view()
        doc["sources"] = {getattr(s, "name", "?"): s.snapshot() for s in self.sources}
        doc["pipeline"] = {
            "completed": self.pipeline.completed,
            "failed": self.pipeline.failed,
            "in_flight": self.pipeline.in_flight(),
            "reloads": self.reloads,
        }
        doc["system"] = system_facts(self.cfg.device.state_dir)
        doc["deploy"] = self.deploy.state()
        doc["posture"] = self.posture.health()  # memory protection, clock, last scan (docs/security.md)
        api = doc["sources"].get("api", {}).get("responses", {})
        doc["security"] = {
            "api_unauthorized": api.get("401", 0),
            "api_forbidden": api.get("403", 0),
            "rejected_inputs": doc.get("rejected", 0),
            **self._security_health(),
        }
        return doc

    def stall_bound_s(self) -> float:
        """How long one inference may run before it counts as stuck: ``STALL_FACTOR`` x one run as the
        self-test measured it on this device, never less than ``hang_timeout_s``. Judged apart from liveness:
        on a slow board (a Pi Zero 2 running YOLO) one healthy inference can outlast the liveness timeout.
        The self-test's figure, not the served requests' percentiles: one slow request must not widen the
        bound for the next stuck one."""
        floor = self.cfg.service.hang_timeout_s
        engine = self.pipeline.engine
        if engine is None:
            return floor
        measured_ms = float(engine.health().get("selftest_run_ms") or 0.0)
        return max(floor, STALL_FACTOR * measured_ms / 1000.0)

    def _security_health(self) -> dict[str, Any]:
        """Lockouts, integrity state, the audit log's head and the last alert (docs/security.md)."""
        api = self.api.security() if self.api is not None else {}
        integrity: dict[str, Any] = {"state": "off"}
        if self.integrity is not None:
            integrity = self.integrity.health()
        # Both carry an ISO 8601 UTC "time" of the same form: the newest is the last alert.
        alerts = sorted((a for a in (integrity.get("last_alert"), api.get("last_lockout")) if a),
                        key=lambda a: str(a.get("time")), reverse=True)
        return {
            "lockouts": api.get("lockouts", 0),
            "locked_clients": api.get("locked_clients", 0),
            "auth_failures": api.get("auth_failures", 0),
            "rate_anomalies": api.get("rate_anomalies", 0),
            "budgets": api.get("budgets", {"enabled": False}),  # per-token query budgets (docs/security.md)
            "integrity": integrity,
            "audit": self.audit.health() if self.audit is not None else None,
            "last_alert": alerts[0] if alerts else None,
        }

    # -- integrity monitor
    # ------------------------------------------------------------------------------------------------
    def _integrity_monitor(self, cfg: ServiceConfig) -> IntegrityMonitor | None:
        if not cfg.integrity.enabled:
            return None
        targets: dict[str, Path] = {"config": cfg.path}
        for i, pub in enumerate(cfg.model.trust):
            targets[f"trust{i}"] = pub
        if cfg.model.revocations is not None:
            targets["revocations"] = cfg.model.revocations
        if cfg.api.enabled and cfg.api.tokens_file is not None:
            targets["tokens"] = cfg.api.tokens_file
        if cfg.service.hooks_dir is not None:
            targets["hooks"] = cfg.service.hooks_dir
        for i, extra in enumerate(cfg.integrity.paths):
            targets[f"path{i}"] = extra
        return IntegrityMonitor(
            config=cfg.integrity,
            state_dir=cfg.device.state_dir,
            targets=targets,
            package_dir=Path(edgeguard.__file__).resolve().parent,
            version=edgeguard.__version__,
            signing_key=self.signing_key,
            on_report=self._integrity_report,
        )

    def _publish_checkpoint(self, kind: str, data: dict[str, Any]) -> None:
        # The log is created before the link (the link observes every event for the log).
        link = getattr(self, "link", None)
        if link is not None:
            link.publish_event(kind, data)

    def _integrity_report(self, report: IntegrityReport, previous: IntegrityReport | None) -> None:
        """Called by the monitor (its thread; the executor at start and reload) when the outcome changed."""
        policy = self.cfg.integrity.policy
        if report.state == "baseline-taken":
            self.link.publish_event("integrity-baseline", {"taken": report.time})
            return
        if report.alert:
            reason = report.reason()
            _log.error("%s (policy %s)", reason, policy)
            data = {"state": report.state, "changed": list(report.changed[:20]), "policy": policy,
                    "reason": reason}
            self.hooks.fire("integrity-alert", data)
            self.link.publish_event("integrity-alert", data)
            if policy == "refuse":
                self.integrity_block = reason
                self.model_error = reason
                if self.pipeline.engine is not None:
                    self.pipeline.unload(f"not serving: {reason}")
                else:
                    self.pipeline.stop_accepting(f"not serving: {reason}")
            return
        if previous is not None and previous.alert:
            self.integrity_block = None
            self.link.publish_event("integrity-restored", {"checked": report.time})

    def verdict(self) -> dict[str, Any]:
        """The checks behind every watchdog kick: inference progressing, outbox accepting, link loop alive.

        An outbox alarm (disk full or failing) makes the device *degraded*, not unhealthy: the outbox keeps
        accepting into its bounded memory queue, and a restart could neither free the disk nor keep those
        acknowledged results, so withholding the watchdog's kicks would turn an alarm into certain loss.
        """
        stalled_s = self.pipeline.oldest_in_flight_s()
        if stalled_s > 0.0:
            bound = self.stall_bound_s()
            if stalled_s > bound:
                return {"healthy": False, "stalled": True,
                        "reason": f"inference stalled for {stalled_s:.1f} s (bound {bound:.1f} s)"}
        # Not running, and not because link.start() is still creating its thread in the executor.
        if not self.link.loop_alive and (self._link_start is None or self._link_start.done()):
            return {"healthy": False, "stalled": False, "reason": "MQTT link loop not running"}
        alarm = self.outbox.stats().alarm
        degraded = f"outbox: {alarm}" if alarm else ""
        # A source thread that died is never silent: /v1/health and the heartbeat say which one.
        dead = [str(getattr(s, "name", "?")) for s in self.sources if getattr(s, "dead", False)]
        degraded = degraded or (f"source {dead[0]} stopped (see the device log)" if dead else "")
        return {"healthy": True, "stalled": False, "reason": "", "degraded": degraded}

    def status_line(self) -> str:
        engine = self.pipeline.engine
        if self.mode == "safe":
            return "SAFE STATE: reporting only, not serving"
        if engine is None:
            return f"not serving: {self.model_error or 'no model'}"
        h = engine.health()
        m = engine.manifest
        return (
            f"serving {m.name} v{m.version} on {h.get('accelerator')}; {h.get('inferences', 0)} inferences, "
            f"outbox {self.outbox.stats().depth}, link {'up' if self.link.state.connected else 'down'}"
        )

    def _send(self, msg: dict[str, Any]) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, json.dumps(msg).encode() + b"\n")
        except BlockingIOError:
            pass  # the supervisor is slow to read: skip one beat rather than block the loop
        except OSError:
            _log.error("supervisor gone (liveness pipe closed); stopping")
            self._stop.set()

    # -- lifecycle
    # ---------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._fd >= 0:
            os.set_blocking(self._fd, False)
        self.faults.check_start(self.mode)
        if self.audit is not None:
            self.audit.start()
        self.link.publish_event("service-start", {"mode": self.mode, "pid": os.getpid(),
                                                  "version": edgeguard.__version__})
        if self.integrity is not None:
            await loop.run_in_executor(None, self.integrity.check)  # before serving: the refuse policy
            self.integrity.start()
        # A probation that did not end (this worker's predecessor crashed, hung or lost power on it) is a
        # failed one: back to the previous slot before any model loads.
        rolled_back = await loop.run_in_executor(None, self.deploy.recover, self.link.publish_event)
        if self.mode == "serve":
            self.deploy.host = WorkerDeployHost(self)
            if self._preloaded is not None and rolled_back is not None:
                self._preloaded.close()  # a spare that loaded the slot just rolled back
                self._preloaded = None
            if self._preloaded is not None:
                self.pipeline.swap(self.faults.wrap(self._preloaded))
                self._preloaded = None
            else:
                await loop.run_in_executor(None, self._load_model, False)
            # Before the link starts (inbound topics are subscribed on connect), and even without a valid
            # model: the API then answers health requests and 503, the directory keeps its files.
            self._build_sources()
        if self.cfg.commands.enabled:  # before the link starts: its birth status carries the answer key
            # Command expiry is judged on the worker's wall clock, the same one bundle expiry uses.
            self._commands = await loop.run_in_executor(
                None, lambda: build_commands(self, now=lambda: self._now().timestamp(), key=self.signing_key)
            )
            self._commands.start()
        await self._start_sources()
        # Serving does not wait for the broker: the link starts after the sources, and its first connection
        # attempt (up to link.startup_wait_s against a broker that does not answer) is not waited for before
        # ready; results queue in the outbox meanwhile, as whenever the link is down.
        self._link_start = loop.run_in_executor(None, self.link.start)
        self._link_start.add_done_callback(self._link_started)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload()))
        threading.Thread(target=self._control_reader, name="eg-control", daemon=True).start()
        self._send({"t": "ready", "status": self.status_line()})
        self._check_degraded()
        beat = asyncio.create_task(self._liveness())
        self.posture.start()  # scan now and daily, clock checkpoints (in executor threads)
        await self._stop.wait()
        beat.cancel()
        await self._shutdown()
        if self._link_start is not None and self._link_start.done() and not self._link_start.cancelled():
            failed = self._link_start.exception()
            if failed is not None:
                raise failed
        return 0

    def _link_started(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        if done.exception() is not None:  # the link could not even start (bad TLS files): fatal, as before
            self._stop.set()
            return
        err = done.result()
        if err is not None:
            _log.warning("MQTT link: %s (retrying in the background)", err)

    async def _liveness(self) -> None:
        while True:
            self._check_serving()
            self._send({"t": "alive", **self.verdict(), "status": self.status_line()})
            self._check_degraded()
            await asyncio.sleep(self.cfg.service.liveness_s)

    def _check_degraded(self) -> None:
        engine = self.pipeline.engine
        health = engine.health() if engine is not None else None
        degraded = health is None or bool(health.get("degraded"))
        if degraded != self._degraded and (self._degraded is not None or degraded):
            kind = "degraded" if degraded else "recovered"
            reason = (health.get("degraded_reason") if health is not None else self.model_error) or ""
            self.hooks.fire(kind, {"reason": reason})
            self.link.publish_event(kind, {"reason": reason})
        self._degraded = degraded

    def _check_serving(self) -> None:
        """The expiry timer (every liveness tick, on the loop: a clock read and a comparison): a model past
        its not_after stops serving now. Unloading (closing the engine, hooks) runs off the loop."""
        engine = self.pipeline.engine
        if engine is None or self._stopping_model is not None or self._loop is None:
            return
        problem = serving_problem(
            engine.manifest, trust=self.trust, now=self._now(), model_name=self.cfg.model.name
        )
        if problem is not None:
            self._stopping_model = engine
            self._loop.run_in_executor(None, self._stop_serving, engine, problem)

    def _stop_serving(self, engine: Any, problem: BundleRejected) -> None:
        try:
            if self.pipeline.engine is engine:  # not replaced by a reload meanwhile
                self._unload("bundle-rejected", str(problem), check=problem.check, reload=False)
        finally:
            self._stopping_model = None

    def _unload(self, kind: str, reason: str, *, check: str | None, reload: bool) -> None:
        engine = self.pipeline.engine
        name = engine.manifest.name if engine is not None else "the model"
        _log.error("stopped serving %s: %s", name, reason)
        self.model_error = reason
        self.pipeline.unload(f"not serving: {reason}")
        data = {"reason": reason, "check": check, "bundle": str(self.cfg.model.bundle), "reload": reload}
        self.hooks.fire(kind, data)
        self.link.publish_event(kind, data)

    def _load_model(self, reload: bool) -> bool:
        if self.integrity_block is not None:  # integrity.policy = "refuse" and files changed
            self.model_error = self.integrity_block
            self.pipeline.stop_accepting(f"not serving: {self.integrity_block}")
            return False
        try:
            engine = load_engine(
                self.cfg,
                trust=self.trust,
                device_key=self.device_key,
                now=self._now(),
                clock=self.clock,
                opener=self.faults.opener(),
                bundle=self.deploy.active_bundle(),
            )
        except BundleRejected as exc:
            self._model_failed("bundle-rejected", str(exc), check=exc.check, reload=reload)
            return False
        except OSError as exc:  # a missing or unreadable bundle file: no model, like a rejected bundle
            self._model_failed("bundle-rejected", _unreadable(self.cfg.model.bundle, exc), check=None,
                               reload=reload)
            return False
        except ConfigError as exc:  # a corrupt slot record: no model, said why
            self._model_failed("bundle-rejected", str(exc), check=None, reload=reload)
            return False
        except EdgeGuardError as exc:  # backend failed its self-test, ...
            self._model_failed("degraded", str(exc), check=None, reload=reload)
            return False
        self.pipeline.swap(self.faults.wrap(engine))
        self.model_error = None
        _log.info("model %s v%d ready", engine.manifest.name, engine.manifest.version)
        m = engine.manifest
        self.link.publish_event("bundle-accepted", {"model": m.name, "version": m.version, "reload": reload})
        return True

    def model_changed(self) -> None:
        """A deploy switched models or rolled back: the supervisor drops a spare loaded with the old one."""
        self._send({"t": "model-changed"})

    def now_utc(self) -> datetime:
        return self._now()

    def load_model_now(self) -> bool:
        """Load the bundle the slot record names active, replacing the serving one (a deploy rollback)."""
        return self._load_model(True)

    def _model_failed(self, kind: str, reason: str, *, check: str | None, reload: bool) -> None:
        _log.error("%s%s", "reload: " if reload else "", reason)
        data = {"reason": reason, "check": check, "bundle": str(self.cfg.model.bundle), "reload": reload}
        self.hooks.fire(kind, data)
        self.link.publish_event(kind, data)
        engine = self.pipeline.engine
        if engine is None:
            self.model_error = reason
            self.pipeline.stop_accepting(f"not serving: {reason}")
            return
        # The new bundle was refused; the one serving keeps serving only if it still passes the trust store
        # just rebuilt and its expiry (a revoked signer's model must not run on because the file is the same).
        problem = serving_problem(
            engine.manifest, trust=self.trust, now=self._now(), model_name=self.cfg.model.name
        )
        if problem is not None:
            # One event per cause: the refusal above already named it when it was the same check.
            if problem.check == check:
                self.model_error = str(problem)
                self.pipeline.unload(f"not serving: {problem}")
            else:
                self._unload("bundle-rejected", str(problem), check=problem.check, reload=reload)

    def _build_sources(self) -> None:
        self.api, self.sources = build_sources(self)

    async def _start_sources(self) -> None:
        if self.api is not None:
            await self.api.start()
            _log.info("API listening on %s", ", ".join(self.api.bound))
        for s in self.sources:
            if s is not self.api:
                s.start()

    def request_reload(self) -> bool:
        """Schedule a reload on the event loop from any thread (the admin API); False before :meth:`run`."""
        loop = self._loop
        if loop is None:
            return False
        loop.call_soon_threadsafe(lambda: loop.create_task(self._reload()))
        return True

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        _log.info("SIGHUP: reloading the config and the bundle")
        try:
            new = await loop.run_in_executor(None, load_config, self.cfg.path)
        except ConfigError as exc:
            _log.error("reload refused, keeping the running config: %s", exc)
            self.link.publish_event("reload-failed", {"reason": str(exc)})
            return
        self.cfg = new
        await loop.run_in_executor(None, self._rebaseline, new)
        if self.api is not None and new.api.enabled:
            try:
                self.api.replace_tokens(load_tokens(new))
            except ConfigError as exc:
                _log.error("reload: keeping the old API tokens: %s", exc)
        try:
            # From the files' contents on every reload, whether or not the paths changed: a revocation or a
            # replaced .pub must take effect now.
            self.trust, self.device_key, _ = await loop.run_in_executor(None, load_keys, new)
        except EdgeGuardError as exc:
            # Fail closed: a revocation list that cannot be read must not mean "nothing is revoked".
            reason = f"trust store or device key unreadable: {exc}"
            _log.error("reload: %s", reason)
            self.link.publish_event("reload-failed", {"reason": reason})
            if self.pipeline.engine is not None:
                await loop.run_in_executor(
                    None, lambda: self._unload("bundle-rejected", reason, check=None, reload=True)
                )
            else:
                self.model_error = reason
                self.pipeline.stop_accepting(f"not serving: {reason}")
            return
        await loop.run_in_executor(None, self._reload_commands, new)
        ok = await loop.run_in_executor(None, self._load_model, True)
        if ok:
            self.reloads += 1
            manifest = self.pipeline.manifest()
            self.hooks.fire("reloaded", {"model": manifest.name if manifest is not None else None})
            self.link.publish_event("reloaded", {"reloads": self.reloads})
            if not self.sources and self.mode == "serve":  # pragma: no cover - sources exist in serve mode
                self._build_sources()
                await self._start_sources()

    def _reload_commands(self, new: ServiceConfig) -> None:
        """The operator keys and revocations, from the files, on every reload (enabling [commands] or changing
        its other keys takes a restart)."""
        if self._commands is None:
            return
        try:
            self._commands.gate.replace_operators(load_operators(new))
        except EdgeGuardError as exc:
            # Fail closed, like the bundle trust store: an unreadable revocation list must not mean "none".
            reason = f"operator keys unreadable, refusing every command: {exc}"
            _log.error("reload: %s", reason)
            self._commands.gate.replace_operators(TrustStore())
            self.link.publish_event("reload-failed", {"reason": reason})

    def request_restart(self, reason: str) -> bool:
        """Ask the supervisor for a clean restart of this worker (SIGTERM, drain, start again; not counted as
        a failure). False without a supervisor."""
        if self._fd < 0:
            return False
        self._send({"t": "restart", "reason": reason})
        return True

    def _rebaseline(self, cfg: ServiceConfig) -> None:
        """A reload is the operator's word that the config, keys, tokens and hooks are as meant: take them as
        the new baseline (recording what changed); the runtime package keeps its baseline."""
        old = self.integrity
        if old is not None:
            old.stop()
        self.integrity = self._integrity_monitor(cfg)
        if self.integrity is None:
            return
        self.integrity_block = None
        changed = self.integrity.rebaseline()
        if changed:
            self.link.publish_event("config-changed", {"changed": changed[:20], "count": len(changed)})
        self.integrity.start()

    def _control_reader(self) -> None:
        """Lines from the supervisor on stdin: events to publish (restart, crash-loop)."""
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("t") == "event" and isinstance(msg.get("data"), dict):
                self.link.publish_event(str(msg.get("kind")), msg["data"])

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        _log.info("stopping: no new requests, finishing in-flight work")
        if self.api is not None:
            await self.api.stop()  # closes the listeners, then waits for in-flight requests
        for s in self.sources:
            if s is not self.api:
                await loop.run_in_executor(None, s.stop)
        self.pipeline.stop_accepting("stopping")
        await loop.run_in_executor(None, self.pipeline.wait_idle, self.cfg.service.stop_timeout_s)
        if self._commands is not None:
            await loop.run_in_executor(None, self._commands.stop)
        await loop.run_in_executor(None, self.deploy.stop)

        if self.integrity is not None:
            await loop.run_in_executor(None, self.integrity.stop)
        if self.audit is not None:  # before the link: its final signed checkpoint is published
            await loop.run_in_executor(None, self.audit.stop)
        await loop.run_in_executor(None, self.link.stop)  # publishes the offline status
        await loop.run_in_executor(None, self.outbox.close)
        await self.posture.stop()  # the shutdown time checkpoint
        engine = self.pipeline.engine
        if engine is not None:
            engine.close()
        _log.info("stopped")


def _preload(cfg: ServiceConfig) -> EngineLike:
    """A spare worker's head start: everything imported, the bundle verified, the engine loaded and
    self-tested (what makes a start slow); the outbox, the link and the sources wait for the takeover, since
    only one worker may own them."""
    trust, device_key, _ = load_keys(cfg)
    bundle = build_deploy(cfg, now=time.time).active_bundle()  # the deploy slot's, when one is active
    return load_engine(cfg, trust=trust, device_key=device_key, now=_utc_now(), bundle=bundle)


def _await_takeover(liveness_fd: int) -> bool:
    """Tell the supervisor this spare is ready, then wait (blocked on stdin, nothing else running) for its
    ``takeover`` line. False when stdin closes first: the supervisor dropped this spare or is gone."""
    os.write(liveness_fd, b'{"t": "spare-ready"}\n')
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("t") == "takeover":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    harden_process()  # before any key or plaintext is read: no core dumps, no ptrace (docs/security.md)
    ap = argparse.ArgumentParser(prog="edgeguard-worker")
    ap.add_argument("-c", "--config", type=Path, required=True)
    ap.add_argument("--mode", choices=("serve", "safe", "spare"), default="serve")
    ap.add_argument("--liveness-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("EDGEGUARD_LOG", "INFO"),
        stream=sys.stderr,
        format="edgeguard[worker %(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config)
        engine = None
        if args.mode == "spare":
            engine = _preload(cfg)
            if not _await_takeover(args.liveness_fd):
                engine.close()
                return 0
        mode = "serve" if args.mode == "spare" else args.mode
        worker = Worker(config=cfg, mode=mode, liveness_fd=args.liveness_fd, engine=engine)
        return asyncio.run(worker.run())
    except EdgeGuardError as exc:
        print(f"edgeguard worker: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, BundleRejected) else 2 if isinstance(exc, ConfigError) else 1
