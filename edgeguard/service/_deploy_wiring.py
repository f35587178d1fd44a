"""The worker's side of a deploy (edgeguard/deploy): how a candidate bundle is opened and self-tested, how the
service switches to it (the reload path: ``Pipeline.swap``), and how the active slot is loaded back.

Kept apart from ``_worker`` (which holds one ``deploy`` attribute); the two do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from edgeguard.bundle import Manifest, RollbackFloor
from edgeguard.clock import TrustedClock
from edgeguard.deploy import Candidate, DeployManager, StepHook
from edgeguard.keys import DeviceKey, TrustStore
from edgeguard.link import MqttLink

from ._faults import FaultInjector
from ._loader import load_engine
from ._pipeline import EngineLike, Pipeline
from .config import ServiceConfig

__all__ = ["build_deploy", "DeployWorker", "WorkerDeployHost"]


class DeployWorker(Protocol):
    cfg: ServiceConfig
    link: MqttLink
    pipeline: Pipeline
    faults: FaultInjector
    trust: TrustStore
    device_key: DeviceKey
    clock: TrustedClock
    model_error: str | None

    def now_utc(self) -> Any: ...

    def load_model_now(self) -> bool: ...

    def model_changed(self) -> None: ...


def build_deploy(cfg: ServiceConfig, *, now: Callable[[], float]) -> DeployManager:
    return DeployManager(
        state_dir=cfg.device.state_dir,
        config=cfg.deploy,
        model_bundle=cfg.model.bundle,
        steps=StepHook(enabled=cfg.service.fault_injection, state_dir=cfg.device.state_dir),
        now=now,
    )


class WorkerDeployHost:
    def __init__(self, worker: DeployWorker) -> None:
        self._w = worker
        self.link = worker.link

    def open_candidate(self, path: Path, check: Callable[[Manifest], None]) -> Candidate:
        w = self._w
        # Verified like any bundle (trust store and revocations as of now, expiry on the trusted clock, the
        # model name, the rollback floor checked but NOT moved: that waits for the commit), self-tested.
        engine: EngineLike = load_engine(
            w.cfg,
            trust=w.trust,
            device_key=w.device_key,
            now=w.now_utc(),
            commit_floor=False,
            opener=w.faults.opener(),
            bundle=path,
            check=check,
        )
        return engine

    def switch(self, engine: Candidate) -> None:
        w = self._w
        w.pipeline.swap(w.faults.wrap(cast(EngineLike, engine)))  # what open_candidate returned
        w.model_error = None
        w.model_changed()
        m = engine.manifest
        w.link.publish_event("bundle-accepted", {"model": m.name, "version": m.version, "reload": True})

    def load_active(self) -> bool:
        self._w.model_changed()  # the record names another slot already, whether or not it loads
        return self._w.load_model_now()

    def serving(self) -> Candidate | None:
        return self._w.pipeline.engine

    def commit_floor(self, name: str, version: int) -> None:
        RollbackFloor(self._w.cfg.device.state_dir).commit(name, version, model_name=self._w.cfg.model.name)
