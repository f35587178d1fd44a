"""LiteRT (TFLite) backend: one ``Interpreter`` with one delegate choice, created from memory.

``ai_edge_litert`` is preferred; ``tflite_runtime`` is used where a board only has that. tflite-runtime
2.14 (its last release) was built against numpy 1.x: it imports under numpy 2 but creating an interpreter
fails with ``_ARRAY_API not found``, which is reported as such rather than as an obscure import error.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator

from ._backend import Backend, TensorInfo, one_line, scrub_bytes
from ._cache_dirs import check_cache_dirs

__all__ = ["DEFAULT_DELEGATE_LIBRARIES", "LiteRTBackend", "LiteRTLibrary", "litert_library", "litert_module",
           "litert_unavailable"]

DEFAULT_DELEGATE_LIBRARIES = {"edgetpu": "libedgetpu.so.1", "gpu": "libtensorflowlite_gpu_delegate.so"}


def litert_module() -> tuple[Any, str]:
    """The interpreter module and its package name."""
    mod, package, _ = _import_litert()
    if mod is None:
        raise BackendError("no LiteRT interpreter installed: pip install ai-edge-litert "
                           "(or tflite-runtime with numpy<2 on boards that only have that)")
    return mod, package


def _import_litert() -> tuple[Any, str, str | None]:
    """(module or None, package name, why ai-edge-litert was not the one used or None)."""
    try:
        # Imported on first use: LiteRT is an optional extra, and only tflite bundles need it.
        from ai_edge_litert import interpreter as mod  # noqa: PLC0415

        return mod, "ai-edge-litert", None
    except ImportError as exc:
        # A module that is present but fails to import (a broken wheel) must not pass for "not installed".
        why = ("ai_edge_litert not installed" if exc.name in ("ai_edge_litert", "ai_edge_litert.interpreter")
               else f"ai_edge_litert failed to import ({one_line(exc)})")
    try:
        from tflite_runtime import interpreter as mod  # noqa: PLC0415

        return mod, "tflite-runtime", why
    except ImportError:
        return None, "", why


@dataclass(frozen=True)
class LiteRTLibrary:
    """Which LiteRT interpreter this process uses, for ``edgeguard doctor``."""

    module: str | None  # import name ("ai_edge_litert", "tflite_runtime"), None when neither is usable
    version: str | None
    note: str | None  # why the preferred one is not used, or what will go wrong with the one that is


def litert_library() -> LiteRTLibrary:
    """Name the interpreter ``LiteRTBackend`` would use, its version, and why the other one is not used."""
    mod, package, why = _import_litert()
    if mod is None:
        return LiteRTLibrary(None, None, f"{why}; tflite_runtime not installed either: no tflite bundle "
                                         "can run (pip install ai-edge-litert)")
    module = package.replace("-", "_")
    version = _distribution_version(package)
    if package == "tflite-runtime":
        note = f"{why}; using tflite_runtime"
        if int(np.__version__.split(".")[0]) >= 2:
            note += (f", which was built for numpy 1.x and fails with numpy {np.__version__}: install "
                     "ai-edge-litert or numpy<2")
        return LiteRTLibrary(module, version, note)
    other = _distribution_version("tflite-runtime")
    also = None if other is None else f"tflite_runtime {other} also installed; ai_edge_litert is preferred"
    return LiteRTLibrary(module, version, also)


def _distribution_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def litert_unavailable(accelerator: Accelerator) -> str | None:
    """Why this delegate cannot be used here before trying it, or None (delegate libraries are only known
    once ``load_delegate`` tries to open them)."""
    try:
        litert_module()
    except BackendError as exc:
        return str(exc)
    return None


def _numpy2_hint(package: str, exc: BaseException) -> str:
    if package == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
        return (f"tflite-runtime was built for numpy 1.x and fails with numpy {np.__version__} "
                f"({one_line(exc)}); install ai-edge-litert or numpy<2")
    return one_line(exc)


class LiteRTBackend(Backend):
    runtime = "litert"

    def __init__(self, model: bytes | bytearray, *, accelerator: Accelerator, threads: int) -> None:
        super().__init__(accelerator=accelerator)
        mod, package = litert_module()
        self.package = package
        kind = accelerator.kind
        opts = accelerator.options
        kwargs: dict[str, Any] = {"num_threads": accelerator.threads or threads}
        if kind == "builtin":
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif kind in ("edgetpu", "gpu", "external"):
            check_cache_dirs(accelerator)  # a delegate's serialization cache holds the weights: RAM only
            library = str(opts.get("library", DEFAULT_DELEGATE_LIBRARIES.get(kind, "")))
            raw_opts = dict(opts.get("delegate_options", {}))
            delegate_opts: dict[str, str] = {k: str(v) for k, v in raw_opts.items()}
            if kind == "edgetpu" and "device" in opts:
                delegate_opts["device"] = str(opts["device"])
            try:
                # Open the library first: a missing one is then a clean OSError here, rather than a
                # half-built Delegate object whose destructor raises inside LiteRT.
                ctypes.CDLL(library)
                delegate = mod.load_delegate(library, delegate_opts)
            except Exception as exc:
                raise BackendError(f"litert/{self.label}: cannot load delegate {library}: {one_line(exc)}") \
                    from None
            kwargs["experimental_delegates"] = [delegate]
            # Delegated graphs still need the builtin kernels for ops the delegate leaves on the CPU, but must
            # not also get XNNPACK applied first (it would claim the ops before the accelerator can).
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        # The interpreter reads the flatbuffer in place for as long as it lives, so it gets its own bytes copy
        # (the library accepts nothing else); that copy is scrubbed when the backend is closed.
        self._model_copy: bytes | None = bytes(model)
        try:
            interp = mod.Interpreter(model_content=self._model_copy, **kwargs)
            interp.allocate_tensors()
        except Exception as exc:
            self._model_copy = None
            raise BackendError(f"litert/{self.label}: interpreter creation failed: "
                               f"{_numpy2_hint(package, exc)}") from None
        self._interp = interp
        self._read_details()
        self._inputs = tuple(TensorInfo(d["name"], np.dtype(d["dtype"]), self._sig(d))
                             for d in self._in.values())
        self._outputs = tuple(TensorInfo(d["name"], np.dtype(d["dtype"]), self._sig(d)) for d in self._out)

    def _read_details(self) -> None:
        """Tensor details and current input shapes, read again after every resize."""
        interp = self._interp
        self._in = {d["name"]: d for d in interp.get_input_details()}
        self._out = list(interp.get_output_details())
        self._shapes = {n: tuple(int(v) for v in d["shape"]) for n, d in self._in.items()}

    @staticmethod
    def _sig(detail: Mapping[str, Any]) -> tuple[int | None, ...]:
        sig = detail.get("shape_signature", detail["shape"])
        return tuple(int(d) if int(d) > 0 else None for d in sig)

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        resized = False
        for name, value in inputs.items():
            detail = self._in.get(name)
            if detail is None:
                raise BackendError(f"litert/{self.label}: model has no input {name!r}")
            if self._shapes.get(name) != value.shape:
                interp.resize_tensor_input(detail["index"], list(value.shape))
                resized = True
        if resized:
            interp.allocate_tensors()
            self._read_details()
        for name, value in inputs.items():
            interp.set_tensor(self._in[name]["index"], value)
        interp.invoke()
        # get_tensor copies, so the result stays valid after the next invoke.
        return {d["name"]: interp.get_tensor(d["index"]) for d in self._out}

    def _close(self) -> None:
        del self._interp
        copy, self._model_copy = self._model_copy, None
        if copy is not None:
            scrub_bytes(copy)
