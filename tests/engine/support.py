"""Test seams for the engine: a plaintext model source and backends that fail on command.

The sealed-bundle layer is tested elsewhere; these tests drive the engine through the same ``ModelSource``
interface an opened bundle provides, from plaintext model bytes.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import GoldenSample, Manifest, TensorSpec
from edgeguard.engine import Backend, Engine, TensorInfo, open_backend
from edgeguard.profiles import Accelerator, EngineTuning, Profile, get_profile

# The shipped profiles this machine's CPU runs: the engine tests use them instead of pinning one, so that
# on an aarch64 board (or tools/arm64.sh) they exercise the generic aarch64 profile and a Raspberry Pi 4's.
_AARCH64 = platform.machine() in ("aarch64", "arm64")
HOST_PROFILES: tuple[str, ...] = ("generic-aarch64", "raspberry-pi-4") if _AARCH64 else ("generic-x86_64",)
HOST_PROFILE = HOST_PROFILES[0]


@dataclass
class PlainSource:
    """An in-memory ``ModelSource``: what ``open_bundle`` hands the engine, minus the crypto."""

    manifest: Manifest
    model: bytearray
    golden: Sequence[GoldenSample] = ()
    wiped: bool = field(default=False)

    def wipe(self) -> None:
        self.model[:] = bytes(len(self.model))
        self.wiped = True


def manifest_for(fmt: str, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = (),
                 **extra: Any) -> Manifest:
    return Manifest(format=fmt, name=name, version=1, created="2026-01-01T00:00:00Z", payload_sha256="0" * 64,
                    payload_size=0, chunk_size=65536, publisher_key_id="test", recipient_key_ids=("test",),
                    inputs=tuple(inputs), outputs=tuple(outputs), **extra)


def golden_from(fmt: str, model: bytes, inputs: Mapping[str, np.ndarray]) -> GoldenSample:
    """Reference outputs from the plain CPU kernels, as the publisher's pack step produces them."""
    acc = Accelerator(kind="cpu", label="cpu") if fmt == "onnx" else Accelerator(kind="builtin", label="b")
    backend = open_backend(fmt, acc, model, 2)
    try:
        return GoldenSample(inputs=dict(inputs), outputs=backend.run(inputs))
    finally:
        backend.close()


def profile_with(fmt: str, chain: Sequence[Accelerator], *, tuning: EngineTuning | None = None) -> Profile:
    base = get_profile(HOST_PROFILE)
    kw: dict[str, Any] = {fmt: tuple(chain)}
    return replace(base, engine=tuning or EngineTuning(promote_after_s=30.0, standby=1), **kw)


class FaultyBackend(Backend):
    """Wraps a real backend; fails its runs while ``fail`` is set (an exception, NaN outputs or a hang)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(accelerator=inner.accelerator)
        self.inner = inner
        self.runtime = inner.runtime
        self.fail: str | None = None  # "raise" | "nan" | "hang"
        self.calls = 0
        self.hang_s = 2.0

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail == "raise":
            raise RuntimeError("device lost (injected)")
        out = self.inner.run(inputs)
        if self.fail == "nan":
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        if self.fail == "hang":
            time.sleep(self.hang_s)
        return out

    def _close(self) -> None:
        self.inner.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wait_standby(engine: Engine, timeout: float = 60.0) -> None:
    """Wait (through the public report) until no candidate is still being built in the background."""
    deadline = time.monotonic() + timeout
    while any(c.status == "loading" for c in engine.candidates()):
        assert time.monotonic() < deadline, "standby build did not finish"
        time.sleep(0.005)
