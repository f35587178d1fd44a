"""Backends: library errors become one-line BackendErrors; absent providers are named; copies are scrubbed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeguard.engine import _onnx, open_backend, unavailable_reason
from edgeguard.engine._backend import one_line, scrub_bytes
from edgeguard.engine._litert import _numpy2_hint
from edgeguard.engine._onnx import provider_options
from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator

from .models import conv_model


def test_library_errors_become_one_line_backend_errors() -> None:
    backend = open_backend("onnx", Accelerator(kind="cpu", label="cpu"), conv_model(), 1)
    try:
        with pytest.raises(BackendError) as info:
            backend.run({"x": np.zeros((1, 3, 8, 8), np.float32)})  # wrong shape: onnxruntime raises
        msg = str(info.value)
        assert msg.startswith("onnxruntime/cpu: run failed: ") and "\n" not in msg and len(msg) < 400
    finally:
        backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run({"x": np.zeros((1, 3, 32, 32), np.float32)})


def test_litert_errors_are_normalised(blazeface_path: Path) -> None:
    model = blazeface_path.read_bytes()
    backend = open_backend("tflite", Accelerator(kind="builtin", label="builtin"), model, 1)
    try:
        with pytest.raises(BackendError, match="litert/builtin: run failed"):
            backend.run({"input": np.zeros((1, 128, 128, 3), np.int32)})
        out = backend.run({"input": np.zeros((1, 128, 128, 3), np.float32)})
        assert out["regressors"].shape == (1, 896, 16)
    finally:
        backend.close()


def test_absent_provider_is_named_before_trying() -> None:
    reason = unavailable_reason("onnx", Accelerator(kind="tensorrt", label="trt"))
    assert reason is not None and "TensorrtExecutionProvider is not in this onnxruntime build" in reason
    assert unavailable_reason("onnx", Accelerator(kind="cpu", label="cpu")) is None


def test_missing_provider_cannot_silently_become_cpu() -> None:
    # Forcing a session on an absent provider: onnxruntime would run it on the CPU; the backend refuses.
    with pytest.raises(BackendError, match=r"did not initialise|session creation failed"):
        open_backend("onnx", Accelerator(kind="cuda", label="cuda"), conv_model(), 1)


def test_corrupt_tflite_model_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="litert/xnnpack: interpreter creation failed"):
        open_backend("tflite", Accelerator(kind="xnnpack", label="xnnpack"), b"TFL3" + b"\x00" * 64, 1)


def test_provider_options_translation() -> None:
    trt = Accelerator(kind="tensorrt", label="t", options={"fp16": True, "engine_cache_path": "/dev/shm/c",
                                                          "workspace_mb": 2})
    assert provider_options(trt, 4) == {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                                        "trt_engine_cache_path": "/dev/shm/c",  # tmpfs: a cache holds weights
                                        "trt_max_workspace_size": str(2 << 20)}
    assert provider_options(Accelerator(kind="xnnpack", label="x"), 3) == {"intra_op_num_threads": "3"}
    assert provider_options(Accelerator(kind="acl", label="a", options={"fast_math": True}), 1) == {
        "enable_fast_math": "true"}


def test_tflite_runtime_numpy2_failure_is_explained() -> None:
    exc = ImportError("numpy.core.multiarray failed to import: _ARRAY_API not found")
    msg = _numpy2_hint("tflite-runtime", exc)
    if int(np.__version__.split(".")[0]) >= 2:
        assert "built for numpy 1.x" in msg and "ai-edge-litert" in msg
    assert "_ARRAY_API" in msg


def test_one_line_shortens_huge_messages() -> None:
    text = one_line(TypeError("bad\n" + "x" * 10_000))
    assert "\n" not in text and len(text) <= 320


def test_scrub_bytes_zeroes_an_unshared_buffer() -> None:
    buf = bytes(bytearray(b"secret model" * 100))
    assert scrub_bytes(buf)
    assert buf == bytes(len(buf))
    shared = bytes(bytearray(b"abc" * 10))
    keep = [shared]
    assert not scrub_bytes(shared) and keep[0] == b"abc" * 10


def test_no_litert_installed_is_a_clear_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(BackendError, match=r"no LiteRT interpreter installed: pip install ai-edge-litert"):
        open_backend("tflite", Accelerator(kind="xnnpack", label="xnnpack"), b"TFL3", 1)
    assert unavailable_reason("tflite", Accelerator(kind="xnnpack", label="xnnpack")) is not None


def test_tflite_runtime_is_used_where_ai_edge_litert_is_absent(monkeypatch: pytest.MonkeyPatch,
                                                                blazeface_path: Path) -> None:
    # Every branch asserts: the tflite-runtime leg (tools/legs.py: numpy 1.26 + tflite-runtime 2.14) runs a
    # real model on tflite_runtime; a venv without it gets the clear "nothing installed" error.
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    acc = Accelerator(kind="xnnpack", label="xnnpack")
    if importlib.util.find_spec("tflite_runtime") is None:
        with pytest.raises(BackendError, match=r"no LiteRT interpreter installed"):
            open_backend("tflite", acc, blazeface_path.read_bytes(), 1)
        return
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(BackendError, match=r"tflite-runtime was built for numpy 1\.x and fails with num"):
            open_backend("tflite", acc, blazeface_path.read_bytes(), 1)
        return
    backend = open_backend("tflite", acc, blazeface_path.read_bytes(), 1)
    try:
        assert getattr(backend, "package", None) == "tflite-runtime"
        out = backend.run({"input": np.zeros((1, 128, 128, 3), np.float32)})
        assert out["regressors"].shape == (1, 896, 16)
    finally:
        backend.close()


def test_cpu_session_is_created_from_the_plaintext_buffer_without_a_copy() -> None:
    model = conv_model()
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    acc = Accelerator(kind="cpu", label="cpu")
    public = open_backend("onnx", acc, model, 2)  # bytes: the public onnxruntime API (copy, then scrubbed)
    buffer = bytearray(model)
    direct = open_backend("onnx", acc, buffer, 2)  # bytearray: straight to the binding, no extra copy
    try:
        assert type(direct._sess).__module__.startswith("onnxruntime.capi")  # type: ignore[attr-defined]
        assert type(public._sess).__name__ == "InferenceSession"  # type: ignore[attr-defined]
        buffer[:] = bytes(len(buffer))  # the session owns its parsed copy: wiping the buffer is safe
        np.testing.assert_array_equal(direct.run({"x": x})["y"], public.run({"x": x})["y"])
        for backend in (direct, public):
            opts = backend.session_options()  # type: ignore[attr-defined]
            assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
            assert backend.describe()["providers"] == ["CPUExecutionProvider"]
    finally:
        direct.close()
        public.close()


class _BytesOnlyBinding:
    """An onnxruntime binding from before it took a ``bytearray`` (its constructor rejects anything else)."""

    def __init__(self, options: object, model: object, is_path: bool, read_config: bool) -> None:
        raise TypeError("__init__(): incompatible constructor arguments")


@pytest.mark.parametrize("binding", ["absent", "bytes-only"])
def test_cpu_session_falls_back_to_the_public_api(monkeypatch: pytest.MonkeyPatch, binding: str) -> None:
    # The no-copy path uses a private onnxruntime name; wherever it is missing or refuses the buffer, the
    # public API must give the same session, with its copy of the plaintext dropped and wiped.
    model = conv_model()
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    acc = Accelerator(kind="cpu", label="cpu")
    reference = open_backend("onnx", acc, bytearray(model), 2)  # whichever path this onnxruntime takes
    expected = reference.run({"x": x})["y"]
    reference.close()
    monkeypatch.setattr(_onnx, "_binding_session_class",
                        (lambda ort: None) if binding == "absent" else (lambda ort: _BytesOnlyBinding))
    unshared: list[bool] = []
    real_scrub = _onnx.scrub_bytes

    def spy_scrub(buf: bytes) -> bool:
        # Seen from here, a copy nothing else holds has three references: the caller's variable, this
        # argument and getrefcount's. (The spy's own reference makes the real scrub below refuse.)
        unshared.append(sys.getrefcount(buf) == 3)
        return real_scrub(buf)

    monkeypatch.setattr(_onnx, "scrub_bytes", spy_scrub)
    backend = open_backend("onnx", acc, bytearray(model), 2)
    try:
        sess = backend._sess  # type: ignore[attr-defined]
        assert type(sess).__module__ == "onnxruntime.capi.onnxruntime_inference_collection"
        assert unshared == [True]  # the public API's bytes copy reached the wipe with no other holder
        assert getattr(sess, "_model_bytes", None) is None
        np.testing.assert_array_equal(backend.run({"x": x})["y"], expected)
        opts = backend.session_options()  # type: ignore[attr-defined]
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
        assert backend.describe()["providers"] == ["CPUExecutionProvider"]
    finally:
        backend.close()
