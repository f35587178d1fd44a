"""onnxruntime backend: one ``InferenceSession`` on one execution provider, created from memory."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator

from ._backend import Backend, TensorInfo, one_line, scrub_bytes

__all__ = ["OnnxBackend", "PROVIDERS", "onnx_unavailable", "provider_options"]

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


def onnx_unavailable(accelerator: Accelerator) -> str | None:
    """Why this provider cannot be used with the installed onnxruntime, or None when it is built in."""
    name = PROVIDERS[accelerator.kind]
    available = _ort().get_available_providers()
    if name not in available:
        return f"{name} is not in this onnxruntime build (available: {', '.join(available)})"
    return None


def provider_options(accelerator: Accelerator, threads: int) -> dict[str, str]:
    """Translate EdgeGuard's option names into the provider's own (all values as strings, as ORT wants)."""
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
        model_bytes = bytes(model)  # onnxruntime only accepts bytes; this copy is scrubbed below
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
        except Exception as exc:
            why = one_line(exc)
            raise BackendError(f"onnxruntime/{self.label}: session creation failed: {why}") from None
        # onnxruntime keeps the bytes for its own silent CPU fallback; EdgeGuard does fallback itself, with a
        # self-test, so drop that reference and the retry that would use it, then wipe the copy.
        if hasattr(sess, "disable_fallback"):
            sess.disable_fallback()
        if hasattr(sess, "_model_bytes"):
            sess._model_bytes = None
        scrub_bytes(model_bytes)
        del model_bytes
        used = sess.get_providers()
        if not used or used[0] != provider:
            # onnxruntime falls back to the CPU with only a log line when a provider fails to initialise.
            raise BackendError(f"onnxruntime/{self.label}: {provider} did not initialise "
                               f"(session fell back to {', '.join(used)})")
        self._sess = sess
        self._inputs = tuple(TensorInfo(i.name, np.dtype(_ORT_TYPES.get(i.type, "float32")), _shape(i.shape))
                             for i in sess.get_inputs())
        self._outputs = tuple(TensorInfo(o.name, np.dtype(_ORT_TYPES.get(o.type, "float32")), _shape(o.shape))
                              for o in sess.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._sess.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, values, strict=True))

    def _close(self) -> None:
        del self._sess

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["providers"] = self._sess.get_providers() if not self._closed else []
        return d
