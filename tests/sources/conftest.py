"""Fakes for the sources' own seams: a sink that records requests, and a manifest's input specs."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import InputRejected
from edgeguard.sources import InferenceRequest

SPECS = (TensorSpec(name="x", dtype="float32", shape=(1, 4), value_range=(0.0, 1.0)),)


class RecordingSink:
    """Implements InferenceSink: checks like a guard would (shape, range) and records what it accepted."""

    def __init__(self) -> None:
        self.requests: list[InferenceRequest] = []
        self.lock = threading.Lock()
        self.delay = 0.0

    def __call__(self, request: InferenceRequest) -> dict[str, Any]:
        if request.tensors is not None:
            x = request.tensors.get("x")
            if x is None or x.shape != (1, 4):
                raise InputRejected(
                    f"input 'x': shape {None if x is None else list(x.shape)}, expected [1, 4]"
                )
            if float(np.max(x)) > 1.0:
                raise InputRejected("input 'x': value above 1.0")
        if self.delay:
            threading.Event().wait(self.delay)
        with self.lock:
            self.requests.append(request)
            n = len(self.requests)
        return {"id": f"dev-{n}", "correlation_id": request.correlation_id, "source": request.source}


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()
