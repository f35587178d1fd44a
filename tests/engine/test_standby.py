"""The standby accelerator is built in the background: readiness does not wait for it, a failure meanwhile
waits for it (the request is not lost), the plaintext is wiped once it is built, and close() stops it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec, Tolerance
from edgeguard.engine import Backend, Engine, InferenceResult
from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator, EngineTuning

from .models import conv_model, quantized_variant
from .support import Clock, FaultyBackend, PlainSource, golden_from, manifest_for, profile_with, wait_standby
from .test_fastpath import Opener

X_SPEC = TensorSpec("x", "float32", (1, 3, 32, 32), (0.0, 1.0))
Y_SPEC = TensorSpec("y", "float32", (1, 8, 32, 32))


def _x(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32() -> bytes:
    return conv_model(1)


class GatedOpener(Opener):
    """The test opener, but opening ``gated`` blocks until ``gate`` is set: a slow session creation."""

    def __init__(self, gated: str, int8: bytes | None = None) -> None:
        super().__init__(int8)
        self.gated = gated
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fmt: str, acc: Accelerator, model: bytes | bytearray, threads: int) -> Backend:
        if acc.label == self.gated:
            self.entered.set()
            assert self.gate.wait(30), "test gate never opened"
        return super().__call__(fmt, acc, model, threads)


@pytest.fixture
def gated(fp32: bytes) -> Iterator[tuple[Engine, GatedOpener, PlainSource]]:
    opener = GatedOpener("slow")
    engine, src = _load(fp32, opener, ["fast", "slow"])
    try:
        yield engine, opener, src
    finally:
        opener.gate.set()
        engine.close()


def _load(fp32: bytes, opener: GatedOpener, labels: list[str],
          run_timeout_ms: int | None = None) -> tuple[Engine, PlainSource]:
    golden = golden_from("onnx", fp32, {"x": _x()})
    man = manifest_for("onnx", "conv", [X_SPEC], [Y_SPEC], golden_count=1,
                       golden_tolerance=Tolerance(rtol=1e-3, atol=1e-4))
    src = PlainSource(man, bytearray(fp32), [golden])
    chain = [Accelerator(kind="cpu", label=label) for label in labels]
    tuning = EngineTuning(promote_after_s=30.0, standby=1, run_timeout_ms=run_timeout_ms)
    prof = profile_with("onnx", chain, tuning=tuning)
    engine = Engine.load(src, profile=prof, opener=opener, clock=Clock())
    assert opener.entered.wait(30)  # the background build has reached the gated session
    return engine, src


def _infer_in_thread(engine: Engine) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = engine.infer({"x": _x(9)})
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    return thread, box


def test_engine_is_ready_before_the_standby_is_built(gated: tuple[Engine, GatedOpener, PlainSource]) -> None:
    engine, opener, src = gated
    status = {c.label: (c.status, c.reason) for c in engine.candidates()}
    assert status["fast"] == ("active", None)
    assert status["slow"][0] == "loading" and "background" in str(status["slow"][1])
    assert not src.wiped and any(src.model)  # held for the standby's session, in memory only
    assert engine.infer({"x": _x()}).accelerator == "fast"
    assert engine.health()["degraded"] is False
    opener.gate.set()
    wait_standby(engine)
    assert {c.label: c.status for c in engine.candidates()} == {"fast": "active", "slow": "standby"}
    assert src.wiped and not any(src.model)  # wiped as soon as the standby was built


def test_failure_before_the_standby_is_ready_waits_for_it(
        fp32: bytes, gated: tuple[Engine, GatedOpener, PlainSource]) -> None:
    engine, opener, src = gated
    opener.opened["fast"].fail = "raise"
    thread, box = _infer_in_thread(engine)
    thread.join(0.3)
    assert thread.is_alive()  # the request waits for the standby rather than failing
    opener.gate.set()
    thread.join(30)
    result: InferenceResult = box["result"]
    assert result.accelerator == "slow"
    np.testing.assert_allclose(result.outputs["y"], golden_from("onnx", fp32, {"x": _x(9)}).outputs["y"],
                               rtol=1e-5)
    h = engine.health()
    assert h["degraded"] is True and h["accelerator"] == "slow" and h["demotions"] == 1
    assert "fast demoted" in h["degraded_reason"]
    wait_standby(engine)
    assert src.wiped and not any(src.model)


def test_failure_when_the_standby_build_fails_too_is_reported(fp32: bytes, tmp_path: Any) -> None:
    opener = GatedOpener("int8-npu", quantized_variant(fp32, str(tmp_path)))
    engine, src = _load(fp32, opener, ["fast", "int8-npu"])
    try:
        opener.opened["fast"].fail = "raise"
        thread, box = _infer_in_thread(engine)
        thread.join(0.3)
        assert thread.is_alive()
        opener.gate.set()  # the standby loads but disagrees with the reference: nothing is left
        thread.join(30)
        err = box["error"]
        assert isinstance(err, BackendError)
        msg = str(err)
        assert msg.startswith("no working accelerator left: ") and "device lost (injected)" in msg
        assert "int8-npu: skipped (disagrees with the reference" in msg and "\n" not in msg
        assert src.wiped and not any(src.model)
    finally:
        opener.gate.set()
        engine.close()


def test_close_during_the_standby_build_waits_discards_and_wipes(
        gated: tuple[Engine, GatedOpener, PlainSource]) -> None:
    engine, opener, src = gated
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # a native session creation cannot be interrupted: close() waits for it
    opener.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    slow: FaultyBackend = opener.opened["slow"]
    with pytest.raises(BackendError, match="closed"):
        slow.run({"x": _x()})  # built, then discarded: not kept alive behind a closed engine
    assert src.wiped and not any(src.model)
    assert {c.label: (c.status, c.reason) for c in engine.candidates()} == {
        "fast": ("not tried", "closed"), "slow": ("not tried", "closed")}
    with pytest.raises(BackendError, match="closed"):
        engine.infer({"x": _x()})


def test_waiting_for_the_standby_is_bounded_by_run_timeout(fp32: bytes) -> None:
    opener = GatedOpener("slow")
    engine, src = _load(fp32, opener, ["fast", "slow"], run_timeout_ms=300)
    try:
        opener.opened["fast"].fail = "raise"
        with pytest.raises(BackendError) as info:
            engine.infer({"x": _x()})
        msg = str(info.value)
        assert "device lost (injected)" in msg and "the standby is still being built (waited 300 ms)" in msg
        opener.gate.set()
        wait_standby(engine)
        assert engine.infer({"x": _x()}).accelerator == "slow"  # once built, it serves
        assert src.wiped and not any(src.model)
    finally:
        opener.gate.set()
        engine.close()
