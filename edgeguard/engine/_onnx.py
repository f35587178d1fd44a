"""onnxruntime backend: one ``InferenceSession`` on one execution provider, created from memory."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator

from ._backend import Backend, TensorInfo, one_line, scrub_bytes
from ._cache_dirs import check_cache_dirs

__all__ = ["OnnxBackend", "PROVIDERS", "onnx_unavailable", "onnxruntime_library", "provider_options"]

PROVIDERS: Final[dict[str, str]] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

_ORT_TYPES: Final[dict[str, str]] = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def _ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415 - loaded on first use: `edgeguard --help` should not pay for it
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise BackendError(f"onnxruntime is not installed: {exc}") from None
    return onnxruntime


def onnxruntime_library() -> tuple[str, str | None]:
    """onnxruntime's version, and a note when CPU sessions cannot take the binding's no-copy path."""
    ort = _ort()
    note = None
    if _binding_session_class(ort) is None:
        note = ("onnxruntime binding session not exposed: CPU sessions use the public API "
                "(one more model copy)")
    return str(ort.__version__), note


def onnx_unavailable(accelerator: Accelerator) -> str | None:
    """Why this provider cannot be used with the installed onnxruntime, or None when it is built in."""
    name = PROVIDERS[accelerator.kind]
    available = _ort().get_available_providers()
    if name not in available:
        return f"{name} is not in this onnxruntime build (available: {', '.join(available)})"
    return None


def provider_options(accelerator: Accelerator, threads: int) -> dict[str, str]:
    """Translate EdgeGuard's option names into the provider's own (all values as strings, as ORT wants).
    ``BackendError`` when a cache that holds the model would be written anywhere but to RAM."""
    check_cache_dirs(accelerator)
    o = accelerator.options
    out: dict[str, str] = {}
    kind = accelerator.kind
    if kind == "tensorrt":
        pairs = {"device_id": "device_id", "fp16": "trt_fp16_enable", "int8": "trt_int8_enable",
                 "dla_core": "trt_dla_core", "int8_calibration_table": "trt_int8_calibration_table_name"}
        out.update({pairs[k]: str(v) for k, v in o.items() if k in pairs})
        if "engine_cache_path" in o:
            out["trt_engine_cache_enable"] = "True"
            out["trt_engine_cache_path"] = str(o["engine_cache_path"])
        if "timing_cache_path" in o:
            out["trt_timing_cache_enable"] = "True"
            out["trt_timing_cache_path"] = str(o["timing_cache_path"])
        if "workspace_mb" in o:
            out["trt_max_workspace_size"] = str(int(o["workspace_mb"]) << 20)
    elif kind == "cuda":
        if "device_id" in o:
            out["device_id"] = str(o["device_id"])
        if "gpu_mem_limit_mb" in o:
            out["gpu_mem_limit"] = str(int(o["gpu_mem_limit_mb"]) << 20)
        if "cudnn_conv_algo_search" in o:
            out["cudnn_conv_algo_search"] = str(o["cudnn_conv_algo_search"])
    elif kind == "openvino":
        out.update({k: str(v) for k, v in o.items() if k in ("device_type", "precision", "cache_dir",
                                                            "num_streams")})
        out["num_of_threads"] = str(threads)
    elif kind in ("acl", "armnn"):
        if "fast_math" in o:
            out["enable_fast_math"] = "true" if o["fast_math"] else "false"
    elif kind == "xnnpack":
        out["intra_op_num_threads"] = str(threads)
    return out


def _binding_session_class(ort: Any) -> Any:
    """The binding's session class, or None where this onnxruntime does not expose it.

    A private name (no compatibility promise), so it is looked up defensively, in one place: the tests replace
    this function to force the public path on every onnxruntime version.
    """
    capi = getattr(getattr(ort, "capi", None), "_pybind_state", None)
    return getattr(capi, "InferenceSession", None)


def _direct_session(ort: Any, model: bytes | bytearray, opts: Any, providers: list[Any]) -> Any:
    """A CPU session created straight from the plaintext buffer, or None where that is not possible.

    ``onnxruntime.InferenceSession`` accepts only ``bytes``, so the public API costs one more full copy of the
    plaintext (and a scrub of it): ~8 ms for a 12 MB model here, a third of the session creation. The
    binding underneath (``onnxruntime.capi._pybind_state.InferenceSession``, which the public class wraps)
    takes the ``bytearray`` as it is. It is used for CPU-only sessions, where the public wrapper adds nothing
    but its silent fallback (which EdgeGuard disables anyway); accelerator providers keep the public API,
    which normalises their options and registers their custom ops.
    """
    if len(providers) != 1 or not isinstance(model, bytearray):
        return None
    cls = _binding_session_class(ort)
    if cls is None:
        return None
    name, options = providers[0]
    try:
        sess = cls(opts, model, False, False)  # (options, model, is a path, read config from model)
    except TypeError:
        return None  # an onnxruntime whose binding takes bytes only
    sess.initialize_session([name], [options], set())
    return sess


def _public_session(ort: Any, model: bytes | bytearray, opts: Any, providers: list[Any]) -> Any:
    model_bytes = bytes(model)  # the public API only accepts bytes; this copy is scrubbed below
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
    # onnxruntime keeps the bytes for its own silent CPU fallback; EdgeGuard does fallback itself, with a
    # self-test, so drop that reference and the retry that would use it, then wipe the copy.
    if hasattr(sess, "disable_fallback"):
        sess.disable_fallback()
    if hasattr(sess, "_model_bytes"):
        sess._model_bytes = None
    scrub_bytes(model_bytes)
    return sess


def _shape(raw: Any) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in (raw or ()))


class OnnxBackend(Backend):
    runtime = "onnxruntime"

    def __init__(self, model: bytes | bytearray, *, accelerator: Accelerator, threads: int) -> None:
        super().__init__(accelerator=accelerator)
        ort = _ort()
        provider = PROVIDERS[accelerator.kind]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = accelerator.threads or threads
        opts.inter_op_num_threads = 1
        level = accelerator.options.get("graph_optimization", "all")
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[str(level)]
        if accelerator.kind == "cpu" and accelerator.options.get("arena") is False:
            opts.enable_cpu_mem_arena = False
        if accelerator.kind == "xnnpack":
            # XNNPACK runs its own thread pool; ORT's must not compete with it for the same cores.
            opts.intra_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = [(provider, provider_options(accelerator, accelerator.threads or threads))]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # nodes the accelerator cannot take run on the CPU
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sess = _direct_session(ort, model, opts, providers) or _public_session(ort, model, opts,
                                                                                      providers)
        except Exception as exc:
            why = one_line(exc)
            raise BackendError(f"onnxruntime/{self.label}: session creation failed: {why}") from None
        used = sess.get_providers()
        if not used or used[0] != provider:
            # onnxruntime falls back to the CPU with only a log line when a provider fails to initialise.
            raise BackendError(f"onnxruntime/{self.label}: {provider} did not initialise "
                               f"(session fell back to {', '.join(used)})")
        self._sess = sess
        meta_in = sess.inputs_meta if hasattr(sess, "inputs_meta") else sess.get_inputs()
        meta_out = sess.outputs_meta if hasattr(sess, "outputs_meta") else sess.get_outputs()
        self._inputs = tuple(TensorInfo(i.name, np.dtype(_ORT_TYPES.get(i.type, "float32")), _shape(i.shape))
                             for i in meta_in)
        self._outputs = tuple(TensorInfo(o.name, np.dtype(_ORT_TYPES.get(o.type, "float32")), _shape(o.shape))
                              for o in meta_out)
        self._output_names = [o.name for o in self._outputs]

    def session_options(self) -> Any:
        """The options the session really runs with (read back from onnxruntime)."""
        sess = self._sess
        return sess.session_options if hasattr(sess, "session_options") else sess.get_session_options()

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._sess.run(self._output_names, dict(inputs), None)
        return dict(zip(self._output_names, values, strict=True))

    def _close(self) -> None:
        del self._sess

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["providers"] = self._sess.get_providers() if not self._closed else []
        return d
