"""Publisher-side int8 quantization with an accuracy guard (``edgeguard quantize``).

``quantize_onnx`` turns an fp32 ONNX model (inputs of any dtype) into an int8 model with onnxruntime's
quantizer, handling the preparation users usually trip over (static shapes, opset upgrade, shape inference
that degrades instead of failing). It builds several guarded candidates (static QDQ with nodes kept fp32
where quantization breaks agreement, the other activation type, compute layers only, dynamic), measures
each against fp32 on held-out data and picks the fastest that agrees; when none is faster and within budget
it keeps the fp32 model and says so. ``check_tflite`` accepts pre-quantized TFLite models as they are.
Needs the ``quantize`` extra (onnx, sympy).
"""

from __future__ import annotations

from ._calibration import CalibrationSet, load_calibration
from ._candidates import Candidate, find_candidates
from ._errors import QuantizeError
from ._metrics import Agreement, output_kind
from ._quantizer import CandidateResult, QuantizeOptions, QuantizeReport, quantize_onnx
from ._tflite import TfliteCheck, check_tflite

__all__ = [
    "Agreement",
    "CalibrationSet",
    "Candidate",
    "CandidateResult",
    "QuantizeError",
    "QuantizeOptions",
    "QuantizeReport",
    "TfliteCheck",
    "check_tflite",
    "find_candidates",
    "load_calibration",
    "output_kind",
    "quantize_onnx",
]
