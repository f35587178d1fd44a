"""Fault injection for tests and benchmarks (``service.fault_injection = true`` only; off by default).

``POST /v1/admin/fault {"kind": "hang" | "crash" | "stall"}``: ``hang`` blocks the worker's event loop (its
liveness stops), ``crash`` exits the worker at once with code 70, ``stall`` makes the next inferences block
forever inside the engine (the liveness report says "inference stalled"). ``EDGEGUARD_FAULT=crash-on-start``
in the environment makes the worker exit before it is ready (crash-loop tests).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import InputRejected

from ._pipeline import EngineLike, Pipeline

__all__ = ["FaultInjector"]

FAULT_KINDS = ("hang", "crash", "stall")


class _StallingEngine:
    def __init__(self, inner: EngineLike, injector: FaultInjector) -> None:
        self._inner = inner
        self._inj = injector
        self.manifest: Manifest = inner.manifest

    def _maybe_stall(self) -> None:
        if self._inj.stalled:
            threading.Event().wait()  # never set: the thread is stuck like a wedged accelerator call

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
        elif kind == "hang" and self.loop is not None:
            # Shortly after, so the response still leaves before the loop blocks.
            self.loop.call_soon_threadsafe(self.loop.call_later, 0.2, time.sleep, 3600.0)
        return {"injected": kind}
