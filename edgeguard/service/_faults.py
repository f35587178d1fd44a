"""Fault injection for tests and benchmarks (``service.fault_injection = true`` only; off by default).

``POST /v1/admin/fault {"kind": "hang" | "crash" | "stall" | "slow"}``: ``hang`` blocks the worker's event
loop (its liveness stops), ``crash`` exits the worker at once with code 70, ``stall`` makes the next
inferences block forever inside the engine (the liveness report says "inference stalled"), ``slow`` (with
``"seconds"``) makes the next session run take that much longer, inside the engine's run like a slow board's.
``EDGEGUARD_FAULT=crash-on-start`` in the environment makes the worker exit before it is ready (crash-loop
tests); ``EDGEGUARD_FAULT=slow-run:SECONDS`` makes every session run, the self-test's included, take SECONDS
longer (a board where one inference takes that long). ``EDGEGUARD_FAULT=crash-on-version:N`` makes the worker
exit (code 70) at the first inference a model of version N serves, ``fail-on-version:N`` makes every such
inference fail (a model that crashes, or errs, on probation; docs/fleet.md "Deploy"). The deploy steps have
their own hook (``deploy-pause:STEP``, edgeguard/deploy/_steps.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.engine import Backend, BackendOpener, TensorInfo, open_backend
from edgeguard.errors import BackendError, ConfigError, InputRejected
from edgeguard.profiles import Accelerator

from ._pipeline import EngineLike, Pipeline

__all__ = ["FaultInjector"]

FAULT_KINDS = ("hang", "crash", "stall", "slow")
_MAX_SLOW_S = 600.0


class _SlowBackend(Backend):
    """A session whose runs take longer: the delay sits inside the fast path's run, where a slow board's
    time is spent (what the service's liveness must not wait for)."""

    def __init__(self, inner: Backend, injector: FaultInjector) -> None:
        super().__init__(accelerator=inner.accelerator)
        self.runtime = inner.runtime
        self._inner = inner
        self._inj = injector

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inner.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._inner.outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self._inj.run_delay_s())
        return self._inner.run(inputs)

    def _close(self) -> None:
        self._inner.close()


class _StallingEngine:
    def __init__(self, inner: EngineLike, injector: FaultInjector) -> None:
        self._inner = inner
        self._inj = injector
        self.manifest: Manifest = inner.manifest

    def _maybe_stall(self) -> None:
        if self._inj.stalled:
            threading.Event().wait()  # never set: the thread is stuck like a wedged accelerator call
        bad = self._inj.bad_version
        if bad is not None and bad[1] == self.manifest.version:
            if bad[0] == "crash":
                os._exit(70)
            raise BackendError(f"injected failure of {self.manifest.name} v{self.manifest.version}")

    def infer(self, inputs: Any) -> Any:
        self._maybe_stall()
        return self._inner.infer(inputs)

    def infer_image(self, image: np.ndarray | bytes) -> Any:
        self._maybe_stall()
        return self._inner.infer_image(image)

    def health(self) -> dict[str, Any]:
        return self._inner.health()

    def close(self) -> None:
        self._inner.close()


class FaultInjector:
    def __init__(self, *, enabled: bool, pipeline: Pipeline) -> None:
        self.enabled = enabled
        self._pipeline = pipeline
        self.stalled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._every_run_s = _slow_run_from_env() if enabled else 0.0
        self.bad_version = _bad_version_from_env() if enabled else None
        self._next_run_s = 0.0

    def run_delay_s(self) -> float:
        with self._lock:
            extra, self._next_run_s = self._next_run_s, 0.0
        return self._every_run_s + extra

    def opener(self) -> BackendOpener | None:
        """The backend opener for Engine.load: slowed sessions when faults are on, else the default."""
        if not self.enabled:
            return None

        def open_slowed(fmt: str, acc: Accelerator, model: bytes | bytearray, threads: int) -> Backend:
            return _SlowBackend(open_backend(fmt, acc, model, threads), self)

        return open_slowed

    def check_start(self, mode: str) -> None:
        self.loop = asyncio.get_running_loop()
        # Serve mode only: the safe state is what a crash loop must end in.
        if self.enabled and mode == "serve" and os.environ.get("EDGEGUARD_FAULT") == "crash-on-start":
            os._exit(70)

    def wrap(self, engine: EngineLike) -> EngineLike:
        return _StallingEngine(engine, self) if self.enabled else engine

    def inject(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            raise KeyError("fault")
        kind = args.get("kind")
        if kind not in FAULT_KINDS:
            raise InputRejected(f"fault kind must be one of {', '.join(FAULT_KINDS)}")
        if kind == "crash":
            threading.Timer(0.05, os._exit, args=(70,)).start()
        elif kind == "stall":
            self.stalled = True
        elif kind == "slow":
            seconds = args.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                seconds = -1.0
            if not 0 < seconds <= _MAX_SLOW_S:
                raise InputRejected(f"fault slow needs seconds in (0, {_MAX_SLOW_S:g}]")
            with self._lock:
                self._next_run_s = float(seconds)
        elif kind == "hang" and self.loop is not None:
            # Shortly after, so the response still leaves before the loop blocks.
            self.loop.call_soon_threadsafe(self.loop.call_later, 0.2, time.sleep, 3600.0)
        return {"injected": kind}


def _slow_run_from_env() -> float:
    value = os.environ.get("EDGEGUARD_FAULT", "")
    if not value.startswith("slow-run:"):
        return 0.0
    try:
        seconds = float(value.removeprefix("slow-run:"))
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= _MAX_SLOW_S:
        raise ConfigError(f"EDGEGUARD_FAULT=slow-run:SECONDS needs SECONDS in [0, {_MAX_SLOW_S:g}]")
    return seconds


def _bad_version_from_env() -> tuple[str, int] | None:
    value = os.environ.get("EDGEGUARD_FAULT", "")
    for kind in ("crash", "fail"):
        prefix = f"{kind}-on-version:"
        if value.startswith(prefix):
            text = value.removeprefix(prefix)
            if not text.isdigit() or len(text) > 15:
                raise ConfigError(f"EDGEGUARD_FAULT={prefix}N needs a version number N")
            return kind, int(text)
    return None
