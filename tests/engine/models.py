"""Small real ONNX models built with onnx.helper for fast tests (the real zoo models are used too)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def conv_model(seed: int = 1, *, size: int = 32) -> bytes:
    """x[1,3,S,S] -> Conv(3->16) -> Relu -> Conv(16->8) -> y[1,8,S,S]; ``seed`` picks the weights."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 16, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "B2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "W2", "B2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def quantized_variant(fp32: bytes, tmp_dir: str) -> bytes:
    """The same model quantized to int8 (QDQ): what an accelerator that silently runs int8 computes."""
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = Path(tmp_dir) / "f.onnx", Path(tmp_dir) / "q.onnx"
    src.write_bytes(fp32)
    rng = np.random.default_rng(7)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst.read_bytes()
