"""The device side of a deploy (docs/fleet.md, "Deploy"): fetch -> verify -> self-test -> slot -> switch under
probation -> commit or roll back by itself.

Order of the durable steps, each a power cut may interrupt (``_slots`` says why each is safe):

1. fetch into ``deploy/partial-<sha>.egm`` and check the whole file's SHA-256 against the signed command;
2. verify it like any bundle (trust store, revocations, expiry, model name, rollback floor, recipient) without
   moving the floor, refuse a version rolled back before, load and self-test it (in memory only);
3. move the file into the free slot (a rename), then write the record ``probation`` naming it active;
4. switch the serving engine (the reload path) and watch: a worker that restarts while the record says
   ``probation`` (crash, hang, power cut) rolls back at its start, before loading a model; error rate, p95
   latency or a failed self-test (the engine degraded) roll back while running;
5. commit: the record says ``committed`` first, then the rollback floor is raised (a cut in between raises it
   at the next start, when the committed slot is opened the normal way).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edgeguard.bundle import Manifest
from edgeguard.errors import BundleRejected, CommandRefused, ConfigError, EdgeGuardError

from ._config import DeployConfig
from ._fetch import Fetcher, SubtreeLink
from ._request import DeployRequest
from ._slots import RefusedVersions, SlotRecord, SlotStore
from ._steps import StepHook

__all__ = ["DeployConfig", "DeployHost", "DeployManager", "Candidate"]

_log = logging.getLogger("edgeguard.deploy")
_LATENCIES = 4096  # probation latency samples kept (newest)


class Candidate(Protocol):
    manifest: Manifest

    def health(self) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


class DeployLink(SubtreeLink, Protocol):
    def publish_event(self, kind: str, data: dict[str, Any]) -> None: ...


class DeployHost(Protocol):
    """What the manager needs from the worker (``edgeguard/service/_deploy_wiring.py``)."""

    @property
    def link(self) -> DeployLink: ...

    def open_candidate(self, path: Path, check: Callable[[Manifest], None]) -> Candidate:
        """Verify the bundle at ``path`` (floor checked, not moved), call ``check`` with its manifest, load
        and self-test it. ``BundleRejected`` / ``EdgeGuardError`` otherwise."""

    def switch(self, engine: Candidate) -> None:
        """Serve ``engine`` from now on (the previous one finishes its requests)."""

    def load_active(self) -> bool:
        """(Re)load the model the slot record names active, the normal way; False when it fails."""

    def serving(self) -> Candidate | None: ...

    def commit_floor(self, name: str, version: int) -> None: ...


class DeployManager:
    def __init__(
        self,
        *,
        state_dir: Path,
        config: DeployConfig,
        model_bundle: Path,
        steps: StepHook,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = config
        self.state_dir = Path(state_dir)
        self.slots = SlotStore(state_dir)
        self.refused = RefusedVersions(state_dir)
        self._model_bundle = model_bundle
        self._steps = steps
        self._now = now
        self.host: DeployHost | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._ok = 0
        self._errors = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCIES)
        self._fetching = False
        self._progress: tuple[int, int] | None = None
        try:
            self._view: dict[str, Any] = self._view_of(self.slots.read())
        except ConfigError as exc:  # a corrupt record: said here and when the model loads (no model)
            self._view = {"state": "failed", "version": None, "rollout": None, "reason": str(exc),
                          "probation_until": None, "time": None}

    # -- state seen by the heartbeat, `status` and /v1/health
    def _view_of(self, rec: SlotRecord) -> dict[str, Any]:
        state = rec.state if rec.version is not None or rec.state == "rolled-back" else "idle"
        version = rec.rolled_back if rec.state == "rolled-back" else rec.version
        return {"state": state, "version": version, "rollout": rec.rollout, "reason": rec.reason,
                "probation_until": rec.probation_until if rec.state == "probation" else None,
                "time": rec.time or None}

    def state(self) -> dict[str, Any]:
        with self._lock:
            view = dict(self._view)
            if self._fetching and self._progress is not None:
                view["chunks"] = {"have": self._progress[0], "total": self._progress[1]}
            return view

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._view.update(changes, time=self._now())

    def active_bundle(self) -> Path:
        """The sealed bundle to serve: the record's active slot, or ``model.bundle``."""
        rec = self.slots.read()
        return self._model_bundle if rec.active == "config" else self.slots.bundle_path(rec.active)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self.host is not None:
            self.host.link.publish_event(kind, data)

    # -- start: a probation that did not end is a failed one
    def recover(self, publish: Callable[[str, dict[str, Any]], None]) -> str | None:
        """At the worker's start, before a model is loaded; the rollback reason when it rolled back."""
        for stale in (self.state_dir / "deploy").glob("partial-*.egm"):
            stale.unlink(missing_ok=True)  # its chunks are not known to be whole; a new deploy starts over
        for d in (self.slots.dir, self.state_dir / "deploy"):
            for tmp in d.glob(".*.tmp") if d.is_dir() else ():
                tmp.unlink(missing_ok=True)  # an atomic write a power cut interrupted
        try:
            rec = self.slots.read()
        except ConfigError as exc:
            _log.error("deploy: %s", exc)
            return None  # the model load says it too, and serves nothing rather than a guess
        if rec.state != "probation":
            return None
        reason = "the worker restarted during probation (crash, hang or power loss)"
        self._roll_back_record(rec, reason, refuse=True)
        publish("deploy-rolled-back", {"reason": reason, "version": rec.version, "model": rec.model,
                                       "rollout": rec.rollout})
        return reason

    def _roll_back_record(self, rec: SlotRecord, reason: str, *, refuse: bool) -> SlotRecord:
        if refuse and rec.model is not None and rec.version is not None:
            self.refused.add(rec.model, rec.version, reason)
        back = rec.previous or "config"
        new = rec.but(active=back, previous=None, state="rolled-back", version=rec.previous_version,
                      previous_version=None, reason=reason, probation_until=None, rolled_back=rec.version)
        self.slots.write(new)
        if rec.active in ("a", "b"):
            self.slots.remove(rec.active)  # the failed bundle: refused from now on anyway
        _log.error("deploy: rolled back %s v%s: %s", rec.model, rec.version, reason)
        with self._lock:
            self._view = self._view_of(new)
        return new

    # -- the `deploy` command (the command thread)
    def deploy(self, args: Mapping[str, str]) -> dict[str, Any]:
        try:
            req = DeployRequest.parse(args, max_bytes=self.cfg.max_bundle_bytes,
                                      default_probation_s=self.cfg.probation_s,
                                      max_probation_s=self.cfg.max_probation_s)
        except CommandRefused as exc:
            self._event("deploy-refused", {"check": exc.check, "reason": exc.detail, "rollout": None,
                                           "sha256": None})
            raise
        host = self.host
        if host is None:
            raise CommandRefused("unsupported", "deploy: this worker does not serve a model (safe state)")
        with self._lock:
            if self._fetching or self._view["state"] == "probation":
                raise CommandRefused("deploy busy", f"deploy: a deploy is already {self._view['state']}")
            self._fetching = True
            self._progress = None
        try:
            return self._deploy(host, req)
        except CommandRefused as exc:
            self._event("deploy-refused", {"check": exc.check, "reason": exc.detail, "rollout": req.rollout,
                                           "sha256": req.sha256})
            if self._view["state"] == "fetching":
                self._set(state="failed", reason=f"{exc.check}: {exc.detail}")
            raise
        finally:
            with self._lock:
                self._fetching = False

    def _deploy(self, host: DeployHost, req: DeployRequest) -> dict[str, Any]:
        self._set(state="fetching", version=None, rollout=req.rollout, reason=None, probation_until=None)
        self._event("deploy-started", {"sha256": req.sha256, "size": req.size, "rollout": req.rollout,
                                       "source": "mqtt" if req.source is None else "path"})
        fetcher = Fetcher(state_dir=self.state_dir, sha256=req.sha256, size=req.size, steps=self._steps,
                          stall_s=self.cfg.fetch_stall_s, progress=self._on_progress)
        if req.source is None:
            # A chunk up to the broker's packet limit: the link's own inbound limit bounds it further.
            fetcher.fetch_mqtt(host.link, max_bytes=req.size, stop=self._stop)
        else:
            fetcher.fetch_path(req.source)
        try:
            engine = host.open_candidate(fetcher.path, self._not_refused)
        except BundleRejected as exc:
            fetcher.path.unlink(missing_ok=True)
            check = "refused version" if isinstance(exc, _RefusedVersion) else exc.check
            raise CommandRefused(check, exc.detail) from None
        except EdgeGuardError as exc:
            fetcher.path.unlink(missing_ok=True)
            raise CommandRefused("self-test", str(exc)) from None
        except BaseException:
            fetcher.path.unlink(missing_ok=True)
            raise
        m = engine.manifest
        self._steps.at("verified")
        with self._lock:
            rec = self.slots.read()
            slot = self.slots.free_slot(rec)
            self.slots.install(fetcher.path, slot)
            self._steps.at("slot-written")
            until = self._now() + req.probation_s
            new = rec.but(active=slot, previous=rec.active, state="probation", model=m.name,
                          version=m.version, previous_version=rec.version, rollout=req.rollout,
                          probation_until=until,
                          max_error_rate=req.max_error_rate, max_p95_ms=req.max_p95_ms, reason=None)
            self._steps.half_atomic_write("mid-record", self.slots.record_path, new.to_json())
            self.slots.write(new)
            self._ok = self._errors = 0
            self._latencies.clear()
            host.switch(engine)
            self._view = self._view_of(new)
        self._steps.at("switched")
        _log.info("deploy: %s v%d in slot %s, on probation for %g s", m.name, m.version, slot,
                  req.probation_s)
        self._event("deploy-probation", {"model": m.name, "version": m.version, "slot": slot,
                                         "probation_until": until, "rollout": req.rollout})
        self._start_watch(new)
        return {"state": "probation", "model": m.name, "version": m.version, "slot": slot,
                "probation_until": until, "rollout": req.rollout}

    def _on_progress(self, have: int, total: int) -> None:
        with self._lock:
            self._progress = (have, total)

    def _not_refused(self, m: Manifest) -> None:
        why = self.refused.reason(m.name, m.version)
        if why is not None:
            raise _RefusedVersion(f"{m.name} v{m.version} was rolled back on this device ({why})")

    # -- probation (its own thread)
    def observe(self, latency_ms: float, error: bool) -> None:
        """Every served request (the pipeline calls this); counted while on probation."""
        if self._view.get("state") != "probation":
            return
        with self._lock:
            if error:
                self._errors += 1
            else:
                self._ok += 1
                self._latencies.append(latency_ms)

    def _start_watch(self, rec: SlotRecord) -> None:
        self._watch = threading.Thread(target=self._probation, args=(rec,), name="eg-probation", daemon=True)
        self._watch.start()

    def _probation(self, rec: SlotRecord) -> None:
        assert rec.probation_until is not None
        tick = 0.25
        while not self._stop.wait(tick):
            with self._lock:
                if self.slots.read() != rec:
                    return  # rolled back by a command meanwhile
                final = self._now() >= rec.probation_until
                reason = self._judge(rec, final=final)
                if reason is not None:
                    self._roll_back_record(rec, reason, refuse=True)
                elif final:
                    self._commit(rec)
                    return
            if reason is not None:  # the record says rolled back: now load the previous model (seconds)
                self._event("deploy-rolled-back", {"reason": reason, "version": rec.version,
                                                   "model": rec.model, "rollout": rec.rollout})
                if self.host is not None and not self.host.load_active():
                    _log.error("deploy: the previous model did not load after the rollback")
                return

    def _judge(self, rec: SlotRecord, *, final: bool) -> str | None:
        n = self._ok + self._errors
        if n and (final or n >= self.cfg.min_requests):
            rate = self._errors / n
            if rate > rec.max_error_rate:
                return f"error rate {rate:.3f} over {rec.max_error_rate:g} ({self._errors} of {n} requests)"
        lat = sorted(self._latencies)
        if rec.max_p95_ms is not None and lat and (final or len(lat) >= self.cfg.min_requests):
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            if p95 > rec.max_p95_ms:
                return f"p95 latency {p95:.1f} ms over {rec.max_p95_ms:g} ms ({len(lat)} requests)"
        host = self.host
        engine = host.serving() if host is not None else None
        if engine is None:
            return "self-test: the new model stopped serving"
        health = engine.health()
        if health.get("degraded"):
            return f"self-test: {health.get('degraded_reason') or 'engine degraded'}"
        return None

    def _commit(self, rec: SlotRecord) -> None:
        assert rec.model is not None and rec.version is not None
        done = rec.but(state="committed", probation_until=None)
        self._steps.half_atomic_write("mid-commit", self.slots.record_path, done.to_json())
        self.slots.write(done)
        self._steps.at("committed")
        if self.host is not None:
            self.host.commit_floor(rec.model, rec.version)
        self._steps.at("floor-raised")
        self._view = self._view_of(done)
        _log.info("deploy: %s v%d committed", rec.model, rec.version)
        self._event("deploy-committed", {"model": rec.model, "version": rec.version, "rollout": rec.rollout,
                                         "reason": None})

    # -- the `rollback` command
    def rollback(self, args: Mapping[str, str]) -> dict[str, Any]:
        if set(args) - {"reason"}:
            raise CommandRefused("malformed", "rollback takes only reason=TEXT")
        reason = (args.get("reason") or "requested by a remote command")[:200]
        host = self.host
        if host is None:
            raise CommandRefused("unsupported", "rollback: this worker does not serve a model (safe state)")
        with self._lock:
            rec = self.slots.read()
            if rec.state == "probation":
                self._roll_back_record(rec, reason, refuse=False)
            elif rec.previous is not None:
                self._back_to_previous(rec, reason)
            else:
                raise CommandRefused("failed", "rollback: no previous slot to return to")
        if not host.load_active():
            raise CommandRefused("failed", "rollback: the previous model did not load (see the events)")
        self._event("deploy-rolled-back", {"reason": reason, "version": rec.version, "model": rec.model,
                                           "rollout": rec.rollout})
        engine = host.serving()
        m = engine.manifest if engine is not None else None
        return {"state": "rolled-back", "model": m.name if m else None, "version": m.version if m else None}

    def _back_to_previous(self, rec: SlotRecord, reason: str) -> SlotRecord:
        """After a commit: the previous slot only if the rollback floor still admits it (checked by opening
        it before anything changes)."""
        assert rec.previous is not None
        path = self._model_bundle if rec.previous == "config" else self.slots.bundle_path(rec.previous)
        host = self.host
        assert host is not None
        try:
            host.open_candidate(path, lambda m: None).close()
        except BundleRejected as exc:
            raise CommandRefused(exc.check, f"rollback: the previous bundle is refused: {exc.detail}") \
                from None
        except (EdgeGuardError, OSError) as exc:
            raise CommandRefused("failed", f"rollback: the previous bundle does not load: {exc}") from None
        new = rec.but(active=rec.previous, previous=rec.active, state="rolled-back",
                      version=rec.previous_version, previous_version=rec.version, reason=reason,
                      probation_until=None, rolled_back=rec.version)
        self.slots.write(new)
        with self._lock:
            self._view = self._view_of(new)
        return new

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            with contextlib.suppress(RuntimeError):
                self._watch.join(5.0)


class _RefusedVersion(BundleRejected):
    def __init__(self, detail: str) -> None:
        super().__init__("rollback", detail)
        self.refused_version = True
