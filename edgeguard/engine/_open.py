"""Opening a backend for a model format and an accelerator candidate."""

from __future__ import annotations

from collections.abc import Callable

from edgeguard.profiles import Accelerator

from ._backend import Backend
from ._litert import LiteRTBackend, litert_unavailable
from ._onnx import OnnxBackend, onnx_unavailable

__all__ = ["BackendOpener", "open_backend", "unavailable_reason", "reference_accelerator"]

# (model format, accelerator, plaintext model, default threads) -> Backend; raises BackendError on failure.
BackendOpener = Callable[[str, Accelerator, "bytes | bytearray", int], Backend]


def unavailable_reason(model_format: str, accelerator: Accelerator) -> str | None:
    """Why this candidate cannot even be tried here (provider not built in, runtime missing), else None."""
    if model_format == "onnx":
        return onnx_unavailable(accelerator)
    return litert_unavailable(accelerator)


def open_backend(model_format: str, accelerator: Accelerator, model: bytes | bytearray,
                 threads: int) -> Backend:
    """Create the session/interpreter for ``model`` on ``accelerator`` (``BackendError`` when it fails)."""
    if model_format == "onnx":
        return OnnxBackend(model, accelerator=accelerator, threads=threads)
    if model_format == "tflite":
        return LiteRTBackend(model, accelerator=accelerator, threads=threads)
    raise ValueError(f"unknown model format {model_format!r}")


def reference_accelerator(model_format: str) -> Accelerator:
    """The plain CPU kernels every result is checked against when a bundle carries no golden vectors."""
    return Accelerator(kind="cpu", label="cpu-reference") if model_format == "onnx" else \
        Accelerator(kind="builtin", label="builtin-reference")
