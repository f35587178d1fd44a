"""Pre-quantized TFLite models: accepted as they are, after checking that they really are int8.

EdgeGuard does not convert or quantize TFLite models (that needs TensorFlow, which an edge toolchain should
not pull in); a model quantized by the TFLite converter is already in its final form. ``check_tflite`` loads
it with LiteRT and counts quantized against float tensors, so a float model is refused with a clear message
instead of being packed under a misleading "int8" label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.errors import ConfigError

__all__ = ["TfliteCheck", "check_tflite"]

_QUANT_DTYPES = frozenset({np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)})
_FLOAT_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16)})


@dataclass(frozen=True)
class TfliteCheck:
    path: str
    quantized_tensors: int
    float_tensors: int
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]

    @property
    def quantized(self) -> bool:
        return self.quantized_tensors > self.float_tensors

    def to_json(self) -> dict[str, Any]:
        return {"method": "pre-quantized TFLite (accepted as is)", "path": self.path,
                "quantized_tensors": self.quantized_tensors, "float_tensors": self.float_tensors,
                "inputs": list(self.input_dtypes), "outputs": list(self.output_dtypes)}


def _interpreter(content: bytes) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - optional: the tflite extra
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415
        except ImportError:
            raise ConfigError("checking a TFLite model needs ai-edge-litert (pip install "
                              "'edgeguard[tflite]')") from None
    return Interpreter(model_content=content)


def check_tflite(path: Path) -> TfliteCheck:
    """Inspect a TFLite model; ``ConfigError`` if it cannot be read or is not quantized."""
    try:
        interp = _interpreter(path.read_bytes())
        tensors = interp.get_tensor_details()
        inputs = interp.get_input_details()
        outputs = interp.get_output_details()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable TFLite model: {exc}") from None
    quantized = sum(1 for t in tensors if np.dtype(t["dtype"]) in _QUANT_DTYPES
                    and len(t.get("quantization_parameters", {}).get("scales", ())) > 0)
    floats = sum(1 for t in tensors if np.dtype(t["dtype"]) in _FLOAT_DTYPES)
    check = TfliteCheck(str(path), quantized, floats,
                        tuple(np.dtype(d["dtype"]).name for d in inputs),
                        tuple(np.dtype(d["dtype"]).name for d in outputs))
    if not check.quantized:
        raise ConfigError(f"{path}: TFLite model is not int8-quantized ({quantized} quantized, {floats} "
                          "float tensors); EdgeGuard only quantizes ONNX models: quantize TFLite models with "
                          "the TFLite converter, then pack the result as it is")
    return check
