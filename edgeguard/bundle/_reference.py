"""Publisher-side reference runs: read a model's inputs/outputs and compute golden outputs on the CPU.

Used by ``pack`` only (the publisher's machine, trusted input). onnxruntime for ``.onnx``; LiteRT
(``ai_edge_litert``) for ``.tflite``, falling back to ``tflite_runtime`` on boards that only have that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import ConfigError

__all__ = ["introspect", "run_reference"]

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _ort_session(model: bytes) -> Any:
    import onnxruntime as ort  # noqa: PLC0415 - heavy, publisher side only

    try:
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad model
        raise ConfigError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def _tflite_interpreter(model: bytes) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - optional extra
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415
        except ImportError:
            raise ConfigError(
                "packing a .tflite model needs ai-edge-litert (pip install 'edgeguard[tflite]')"
            ) from None
    try:
        interpreter = Interpreter(model_content=model)
        interpreter.allocate_tensors()
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError for a bad flatbuffer
        raise ConfigError(f"LiteRT cannot load the model: {str(exc).splitlines()[0]}") from None
    return interpreter


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def introspect(model: bytes, model_format: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's declared inputs and outputs (dynamic axes become ``None``)."""
    if model_format == "onnx":
        sess = _ort_session(model)

        def onnx_spec(t: Any) -> TensorSpec:
            dtype = _ORT_TYPES.get(t.type)
            if dtype is None:
                raise ConfigError(f"tensor {t.name!r} has unsupported type {t.type}")
            return TensorSpec(name=t.name, dtype=dtype, shape=tuple(_dim(d) for d in t.shape))

        return tuple(map(onnx_spec, sess.get_inputs())), tuple(map(onnx_spec, sess.get_outputs()))
    interp = _tflite_interpreter(model)

    def tfl_spec(t: Mapping[str, Any]) -> TensorSpec:
        sig = t.get("shape_signature", t["shape"])
        return TensorSpec(
            name=t["name"], dtype=np.dtype(t["dtype"]).name, shape=tuple(_dim(int(d)) for d in sig)
        )

    return (
        tuple(map(tfl_spec, interp.get_input_details())),
        tuple(map(tfl_spec, interp.get_output_details())),
    )


def run_reference(model: bytes, model_format: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model once on the CPU reference backend and return every output by name."""
    try:
        if model_format == "onnx":
            sess = _ort_session(model)
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, dict(inputs)), strict=True))
        interp = _tflite_interpreter(model)
        details = interp.get_input_details()
        # Resize every input first, allocate once, then fill (allocation invalidates earlier tensors).
        for detail in details:
            value = inputs[detail["name"]]
            if tuple(value.shape) != tuple(detail["shape"]):
                interp.resize_tensor_input(detail["index"], value.shape)
        interp.allocate_tensors()
        for detail in details:
            interp.set_tensor(detail["index"], inputs[detail["name"]])
        interp.invoke()
        return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()}
    except KeyError as exc:
        raise ConfigError(f"golden sample lacks model input {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:  # the runtime's own errors: wrong dtype/shape in the golden inputs
        raise ConfigError(f"reference run failed: {str(exc).splitlines()[0]}") from None
