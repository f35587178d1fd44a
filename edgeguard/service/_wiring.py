"""Builds the configured input sources around a worker's pipeline (one place that knows every source)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.clock import TrustedClock
from edgeguard.errors import ServiceUnavailable
from edgeguard.link import MqttLink
from edgeguard.outbox import Outbox
from edgeguard.sites import GroupMember
from edgeguard.sources import ApiSource, DirectorySource, MqttInputSource, QueryBudgets, SerialSource
from edgeguard.sources._budget import STATE_FILE as BUDGET_STATE_FILE

from ._faults import FaultInjector
from ._loader import load_tokens
from ._pipeline import Pipeline
from ._sysinfo import cpu_temp_c
from .config import ServiceConfig

__all__ = ["build_sources", "WorkerView"]


class WorkerView(Protocol):
    """What the sources need from the worker that owns them. A Protocol, so that this module and
    ``_worker`` (which calls :func:`build_sources`) do not import each other."""

    cfg: ServiceConfig
    pipeline: Pipeline
    link: MqttLink
    outbox: Outbox
    faults: FaultInjector
    clock: TrustedClock

    def request_reload(self) -> bool: ...

    def verdict(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def build_sources(worker: WorkerView) -> tuple[ApiSource | None, list[Any]]:
    cfg = worker.cfg
    pipeline = worker.pipeline

    def specs() -> Sequence[TensorSpec]:
        m = pipeline.manifest()
        if m is None:
            # No model (rejected bundle): sources answer 503 / keep files for later instead of refusing input.
            raise ServiceUnavailable(pipeline.unavailable_reason or "not serving: no model")
        return m.inputs

    sources: list[Any] = []
    api: ApiSource | None = None
    if cfg.api.enabled:

        def admin(action: str, args: dict[str, Any]) -> dict[str, Any]:
            if action == "reload":
                if not worker.request_reload():
                    raise KeyError(action)
                return {"reload": "started"}
            if action == "fault":
                return worker.faults.inject(args)
            raise KeyError(action)

        api = ApiSource(
            config=cfg.api.to_api_config(),
            tokens=load_tokens(cfg),
            sink=pipeline,
            specs=specs,
            health=lambda: _api_health(worker),
            admin=admin,
            explainer=functools.partial(_explain, pipeline),
            on_event=worker.link.publish_event,  # lockouts and refused tokens: events and audit records
            # Windows and bucket refills follow the clock that cannot be wound back below its floor.
            budgets=QueryBudgets(cfg.api.budget.to_budget_config(),
                                 state_path=cfg.device.state_dir / BUDGET_STATE_FILE,
                                 now=lambda: worker.clock.now().timestamp()),
        )
        sources.append(api)
    if cfg.mqtt_input.enabled:
        mq = MqttInputSource(
            sink=pipeline,
            specs=specs,
            limits=cfg.mqtt_input.limits(),
            queue_size=cfg.mqtt_input.queue_size,
            max_queued_bytes=cfg.mqtt_input.max_queued_bytes,
            on_reject=lambda src, reason: worker.link.publish_event(
                "input-rejected", {"source": src, "reason": reason}
            ),
        )
        worker.link.on_inbound(
            "input", mq.handle, max_bytes=cfg.mqtt_input.max_body_bytes, on_drop=mq.dropped_by_link
        )
        sources.append(mq)
    if cfg.serial.enabled:
        sources.append(SerialSource(config=cfg.serial.to_serial_config(), sink=pipeline, specs=specs))
    if cfg.directory.enabled:
        sources.append(
            DirectorySource(config=cfg.directory.to_directory_config(), sink=pipeline, specs=specs)
        )
    if cfg.site.enabled:
        sources.append(
            GroupMember(
                config=cfg.site,
                link=cfg.link,
                fleet=cfg.device.fleet,
                device_id=cfg.device.id,
                sink=pipeline,
                specs=specs,
                limits=cfg.mqtt_input.limits(),
                unable=lambda: _unable(worker),
                on_event=worker.link.publish_event,
                temperature=cpu_temp_c,
            )
        )
    return api, sources


def _explain(pipeline: Pipeline, body: bytes, max_passes: int) -> dict[str, Any]:
    """``POST /v1/explain``: through the engine that serves now (503 while none does)."""
    from edgeguard.explain import explain_image_bytes  # noqa: PLC0415 - only when an explanation is asked

    with pipeline.using() as engine:  # a reload meanwhile closes this engine only once the answer is made
        return explain_image_bytes(engine, body, max_passes=max_passes)


def _unable(worker: WorkerView) -> str:
    """Why this device must not take group input now: no model, or degraded (docs/sites.md)."""
    pipeline = worker.pipeline
    if pipeline.engine is None or not pipeline.accepting:
        return f"no model: {pipeline.unavailable_reason or 'not serving'}"
    degraded = worker.verdict().get("degraded")
    if degraded:
        return f"degraded: {degraded}"
    health = pipeline.engine.health()
    if health.get("degraded"):
        return f"degraded: {health.get('degraded_reason') or 'engine'}"
    return ""


def _api_health(worker: WorkerView) -> dict[str, Any]:
    """``GET /v1/health``: the worker's health plus the states a local client cannot see elsewhere while the
    broker is unreachable (heartbeats then go nowhere): the link with its last error, the outbox figures."""
    verdict = worker.verdict()
    return {
        # Not ok while no model serves (rejected, expired, missing bundle, safe state): a probe must see it.
        "ok": verdict["healthy"] and not verdict.get("degraded") and worker.pipeline.engine is not None,
        "alarm": verdict.get("degraded") or None,  # device-level, e.g. the outbox's disk is full
        **worker.health(),
        "link": worker.link.state.to_json(),
        "outbox": worker.outbox.stats().to_json(),
    }
