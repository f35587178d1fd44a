"""Small generated ONNX models for the quantizer's unit tests (the real ones come from the zoo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def head_model(*, opset: int = 17, dynamic: bool = False, anonymous: bool = False) -> onnx.ModelProto:
    """x -> Conv1 -> Relu1 -> Conv2 -> Add2(+Relu1) -> ConvLast -> Sigmoid -> y.

    Compute layers after each node: Conv1 2, Relu1 2, Conv2 1, Add2 1, ConvLast 0, Sigmoid 0.
    """
    rng = np.random.default_rng(0)
    dims: list[int | str] = ["N", 3, "H", "W"] if dynamic else [1, 3, 8, 8]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="Conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="Conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a2"], name="Add2"),
        helper.make_node("Conv", ["a2", "w3"], ["c3"], name="ConvLast"),
        helper.make_node("Sigmoid", ["c3"], ["y"], name="Sigmoid"),
    ]
    if anonymous:
        nodes[5].name = ""
    graph = helper.make_graph(
        nodes, "head", [x], [y],
        [_weight("w1", (4, 3, 3, 3), rng), _weight("w2", (4, 4, 3, 3), rng),
         _weight("w3", (2, 4, 1, 1), rng)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def classifier_model(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: logits [1, 5] for x [1, 3, 16, 16]."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="Relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="Pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="Flatten"),
        helper.make_node("Gemm", ["f", "g", "b"], ["logits"], name="Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "classifier", [x], [y],
        [_weight("w", (16, 3, 3, 3), rng), _weight("g", (5, 16), rng),
         numpy_helper.from_array(np.zeros(5, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
