"""Fast-path selection and fallback with candidates that really fail on this machine."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec, Tolerance
from edgeguard.engine import Backend, Engine, open_backend
from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator, EngineTuning

from .models import conv_model, quantized_variant
from .support import (
    Clock,
    FaultyBackend,
    PlainSource,
    golden_from,
    manifest_for,
    profile_with,
    wait_standby,
)

X_SPEC = TensorSpec("x", "float32", (1, 3, 32, 32), (0.0, 1.0))
Y_SPEC = TensorSpec("y", "float32", (1, 8, 32, 32))


def _x(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32() -> bytes:
    return conv_model(1)


@pytest.fixture(scope="module")
def int8(fp32: bytes, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return quantized_variant(fp32, str(tmp_path_factory.mktemp("q")))


def _source(model: bytes, *, golden: bool = True) -> PlainSource:
    samples = [golden_from("onnx", model, {"x": _x()})] if golden else []
    man = manifest_for("onnx", "conv", [X_SPEC], [Y_SPEC], golden_count=len(samples),
                       golden_tolerance=Tolerance(rtol=1e-3, atol=1e-4))
    return PlainSource(man, bytearray(model), samples)


class Opener:
    """The real opener, plus: a candidate labelled ``int8-npu`` loads the int8 variant of the model (an
    accelerator that silently quantizes), and every backend can be wrapped to fail on command."""

    def __init__(self, int8: bytes | None = None) -> None:
        self.int8 = int8
        self.opened: dict[str, FaultyBackend] = {}
        self.calls: list[str] = []

    def __call__(self, fmt: str, acc: Accelerator, model: bytes | bytearray, threads: int) -> Backend:
        if acc.label == "int8-npu":
            assert self.int8 is not None
            model = self.int8
        self.calls.append(acc.label)
        backend = FaultyBackend(open_backend(fmt, acc, model, threads))
        self.opened[acc.label] = backend
        return backend


def test_chain_skips_absent_broken_and_disagreeing_candidates(fp32: bytes, int8: bytes) -> None:
    chain = [
        Accelerator(kind="tensorrt", label="tensorrt-fp16", options={"fp16": True}),
        Accelerator(kind="cuda", label="cuda"),
        Accelerator(kind="cpu", label="int8-npu"),  # the opener seam loads the int8 variant for this label
        Accelerator(kind="cpu", label="cpu"),
        Accelerator(kind="cpu", label="cpu-spare"),
    ]
    src = _source(fp32)
    engine = Engine.load(src, profile=profile_with("onnx", chain), opener=Opener(int8))
    try:
        wait_standby(engine)
        report = {c.label: c for c in engine.candidates()}
        assert report["tensorrt-fp16"].status == "skipped"
        assert "absent: TensorrtExecutionProvider is not in this onnxruntime build" in str(
            report["tensorrt-fp16"].reason)
        assert report["cuda"].status == "skipped" and "CUDAExecutionProvider" in str(report["cuda"].reason)
        assert report["int8-npu"].status == "skipped"
        assert "disagrees with the reference on sample 0" in str(report["int8-npu"].reason)
        assert report["cpu"].status == "active" and report["cpu"].reason is None
        assert report["cpu-spare"].status == "standby"
        result = engine.infer({"x": _x()})
        assert result.accelerator == "cpu" and result.backend == "onnxruntime"
        np.testing.assert_allclose(result.outputs["y"], src.golden[0].outputs["y"], rtol=1e-5)
        health = engine.health()
        assert health["degraded"] is False and health["accelerator"] == "cpu"
        json.dumps(health)
    finally:
        engine.close()
    assert src.wiped and not any(src.model)


def test_delegate_that_fails_to_load_is_skipped_with_its_reason(blazeface_path: Path, tmp_path: Path) -> None:
    model = blazeface_path.read_bytes()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    golden = golden_from("tflite", model, {"input": x})
    man = manifest_for("tflite", "face", [TensorSpec("input", "float32", (1, 128, 128, 3), (-1.0, 1.0))],
                       golden_count=1, golden_tolerance=Tolerance(rtol=1e-3, atol=1e-3))
    missing = tmp_path / "libvendor_npu_delegate.so"
    chain = [
        Accelerator(kind="edgetpu", label="edgetpu", options={"device": "usb"}),
        Accelerator(kind="external", label="vendor-npu",
                    options={"library": str(missing), "delegate_options": {"cache": "/tmp"}}),
        Accelerator(kind="gpu", label="gpu"),
        Accelerator(kind="xnnpack", label="xnnpack"),
        Accelerator(kind="builtin", label="builtin"),
    ]
    engine = Engine.load(PlainSource(man, bytearray(model), [golden]), profile=profile_with("tflite", chain))
    try:
        wait_standby(engine)
        report = {c.label: c for c in engine.candidates()}
        assert "cannot load delegate libedgetpu.so.1" in str(report["edgetpu"].reason)
        assert report["vendor-npu"].status == "skipped"
        assert f"cannot load delegate {missing}" in str(report["vendor-npu"].reason)
        assert "load failed" in str(report["gpu"].reason)
        assert report["xnnpack"].status == "active"
        assert report["builtin"].status == "standby"
        assert engine.infer({"input": x}).accelerator == "xnnpack"
    finally:
        engine.close()


def _two_candidate_engine(fp32: bytes, clock: Clock, **tuning: Any) -> tuple[Engine, Opener]:
    chain = [Accelerator(kind="cpu", label="fast"), Accelerator(kind="cpu", label="slow")]
    opener = Opener()
    tune = EngineTuning(promote_after_s=30.0, standby=1, **tuning)
    engine = Engine.load(_source(fp32), profile=profile_with("onnx", chain, tuning=tune), opener=opener,
                         clock=clock)
    wait_standby(engine)
    return engine, opener


def test_runtime_failure_demotes_reruns_the_request_and_promotes_after_cooldown(fp32: bytes) -> None:
    clock = Clock()
    engine, opener = _two_candidate_engine(fp32, clock)
    expected = golden_from("onnx", fp32, {"x": _x(9)}).outputs["y"]
    try:
        assert engine.infer({"x": _x(9)}).accelerator == "fast"
        opener.opened["fast"].fail = "raise"
        result = engine.infer({"x": _x(9)})  # the same request, served by the standby
        assert result.accelerator == "slow"
        np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-5)
        h = engine.health()
        assert h["degraded"] is True and h["accelerator"] == "slow" and h["demotions"] == 1
        assert "fast demoted" in h["degraded_reason"] and "device lost (injected)" in h["degraded_reason"]
        # Before the cool-down the demoted accelerator is left alone, even once it works again.
        opener.opened["fast"].fail = None
        clock.t += 29.0
        calls = opener.opened["fast"].calls
        assert engine.infer({"x": _x(9)}).accelerator == "slow"
        assert opener.opened["fast"].calls == calls
        clock.t += 2.0
        assert engine.infer({"x": _x(9)}).accelerator == "fast"
        h = engine.health()
        assert h["degraded"] is False and h["promotions"] == 1 and h["inferences"] == 4
    finally:
        engine.close()


def test_nan_outputs_demote_and_a_failed_promotion_backs_off(fp32: bytes) -> None:
    clock = Clock()
    engine, opener = _two_candidate_engine(fp32, clock)
    try:
        opener.opened["fast"].fail = "nan"
        result = engine.infer({"x": _x()})
        assert result.accelerator == "slow" and np.isfinite(result.outputs["y"]).all()
        assert "NaN/Inf where the reference had none" in engine.health()["degraded_reason"]
        clock.t += 31.0  # cool-down over, but the accelerator still produces NaN: promotion self-test fails
        assert engine.infer({"x": _x()}).accelerator == "slow"
        reason = {c.label: c.reason for c in engine.candidates()}["fast"]
        assert "promotion self-test failed" in str(reason)
        opener.opened["fast"].fail = None
        clock.t += 31.0  # backoff doubled to 60 s: not yet
        assert engine.infer({"x": _x()}).accelerator == "slow"
        clock.t += 30.0
        assert engine.infer({"x": _x()}).accelerator == "fast"
    finally:
        engine.close()


def test_hung_run_times_out_and_the_request_is_served_by_the_standby(fp32: bytes) -> None:
    clock = Clock()
    engine, opener = _two_candidate_engine(fp32, clock, run_timeout_ms=300)
    try:
        opener.opened["fast"].fail = "hang"
        opener.opened["fast"].hang_s = 1.5
        result = engine.infer({"x": _x()})
        assert result.accelerator == "slow"
        status = {c.label: (c.status, c.reason) for c in engine.candidates()}
        assert status["fast"][0] == "hung" and "exceeded 300 ms" in str(status["fast"][1])
        clock.t += 1000.0  # a hung session is never promoted again (it cannot be recreated: plaintext wiped)
        assert engine.infer({"x": _x()}).accelerator == "slow"
        assert engine.health()["degraded"] is True
    finally:
        engine.close()


def test_last_accelerator_failing_raises_and_engine_recovers_after_cooldown(fp32: bytes) -> None:
    clock = Clock()
    engine, opener = _two_candidate_engine(fp32, clock)
    try:
        opener.opened["fast"].fail = "raise"
        opener.opened["slow"].fail = "raise"
        with pytest.raises(BackendError, match="no working accelerator left"):
            engine.infer({"x": _x()})
        h = engine.health()
        assert h["accelerator"] is None and h["degraded"] is True and h["backend_failures"] == 1
        opener.opened["fast"].fail = None
        clock.t += 31.0
        assert engine.infer({"x": _x()}).accelerator == "fast"
    finally:
        engine.close()


def test_no_candidate_passes_lists_every_reason_and_still_wipes(fp32: bytes, int8: bytes) -> None:
    chain = [Accelerator(kind="cuda", label="cuda"), Accelerator(kind="cpu", label="int8-npu")]
    src = _source(fp32)
    with pytest.raises(BackendError) as info:
        Engine.load(src, profile=profile_with("onnx", chain), opener=Opener(int8))
    msg = str(info.value)
    assert "cuda: absent" in msg and "int8-npu: disagrees with the reference" in msg
    assert src.wiped and not any(src.model)


def test_without_golden_vectors_the_cpu_reference_decides(fp32: bytes, int8: bytes) -> None:
    # "int8-npu" has an option, so it is not the plain reference kernels: the reference session is opened
    # as "cpu" (the one candidate identical to it) and kept as that candidate's backend.
    chain = [Accelerator(kind="cpu", label="int8-npu", options={"arena": False}),
             Accelerator(kind="cpu", label="cpu")]
    src = _source(fp32, golden=False)
    opener = Opener(int8)
    engine = Engine.load(src, profile=profile_with("onnx", chain), opener=opener)
    try:
        status = {c.label: (c.status, c.reason) for c in engine.candidates()}
        assert status["int8-npu"][0] == "skipped" and "disagrees" in str(status["int8-npu"][1])
        assert status["cpu"][0] == "active"
        assert opener.calls == ["cpu", "int8-npu"]  # no second session for "cpu": the reference is kept
        assert src.wiped and not any(src.model)
        result = engine.infer({"x": _x(5)})
        want = golden_from("onnx", fp32, {"x": _x(5)}).outputs["y"]
        assert result.accelerator == "cpu"
        np.testing.assert_allclose(result.outputs["y"], want, rtol=1e-5)
    finally:
        engine.close()


def test_standby_zero_loads_only_the_winner(fp32: bytes) -> None:
    chain = [Accelerator(kind="cpu", label="a"), Accelerator(kind="cpu", label="b")]
    prof = profile_with("onnx", chain, tuning=EngineTuning(standby=0))
    src = _source(fp32)
    engine = Engine.load(src, profile=prof)
    try:
        assert src.wiped and not any(src.model)  # wiped before load returned: nothing is built later
        status = {c.label: c.status for c in engine.candidates()}
        assert status == {"a": "active", "b": "not tried"}
    finally:
        engine.close()


def test_health_and_report_never_wait_for_a_long_run(fp32: bytes) -> None:
    """The service's liveness beat reads health() every tick: a run that takes long (a slow board) must not
    hold it up, or the supervisor kills a healthy worker for missing liveness."""
    clock = Clock()
    engine, opener = _two_candidate_engine(fp32, clock)
    fast = opener.opened["fast"]
    try:
        fast.fail, fast.hang_s = "hang", 3.0  # without run_timeout_ms: a run that takes 3 s, then returns
        calls = fast.calls
        done = threading.Event()
        runner = threading.Thread(target=lambda: (engine.infer({"x": _x()}), done.set()))
        runner.start()
        deadline = time.monotonic() + 10
        while fast.calls == calls and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the run to have begun (no hook inside the native call)
        assert fast.calls > calls and not done.is_set()
        t0 = time.monotonic()
        health = engine.health()
        candidates = engine.candidates()
        waited = time.monotonic() - t0
        assert not done.is_set(), "the run ended before health() was read: the check proved nothing"
        assert waited < 1.0, f"health() waited {waited:.2f} s for a run"
        assert health["accelerator"] == "fast" and {c.label for c in candidates} == {"fast", "slow"}
        runner.join(10)
        assert done.is_set()
    finally:
        engine.close()


def test_selftest_measures_one_run_on_this_device(fp32: bytes) -> None:
    clock = Clock()
    engine, _ = _two_candidate_engine(fp32, clock)
    try:
        h = engine.health()
        # One run, not a sum: at most the time all self-tests took (the standby's, built after ready and
        # not in health's selftest_ms, included).
        assert 0.0 < h["selftest_run_ms"] <= engine._fast.selftest_ms
    finally:
        engine.close()
