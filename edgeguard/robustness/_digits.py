"""The built-in classifier of ``edgeguard robustness``: a small MLP trained in numpy on scikit-learn's digits.

The data set is the real one (UCI optical digits, 1,797 8x8 images) read from the CSV inside the
scikit-learn wheel (``edgeguard.zoo`` item ``digits``; scikit-learn itself is never imported or installed).
The model is trained here with plain numpy (full-batch Adam, fixed seed: the same weights every run) and
written as an ONNX graph with ``onnx.helper``: input ``x`` float32 ``[N, 1, 8, 8]`` in ``[0, 1]``, output
``probs`` ``[N, 10]`` (softmax), dynamic batch.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.errors import ConfigError

__all__ = ["Digits", "load_digits", "train_digits_mlp", "mlp_onnx", "DIGITS_META"]

DIGITS_META: dict[str, Any] = {
    "description": "MLP 64-48-10 trained on scikit-learn's digits (8x8 grey, values / 16)",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8], "range": [0.0, 1.0]}],
    "outputs": [{"name": "probs", "dtype": "float32", "shape": [None, 10]}],
    "postprocess": {"kind": "topk", "k": 3, "labels": [str(i) for i in range(10)]},
}


@dataclass(frozen=True)
class Digits:
    x: np.ndarray  # float32 [N, 1, 8, 8] in [0, 1]
    y: np.ndarray  # int64 [N]

    def split(self, *fractions: float, seed: int = 0) -> list[Digits]:
        """Disjoint random parts of the given fractions (the rest is dropped)."""
        order = np.random.default_rng(seed).permutation(len(self.y))
        parts, start = [], 0
        for f in fractions:
            n = round(f * len(self.y))
            idx = order[start:start + n]
            parts.append(Digits(self.x[idx], self.y[idx]))
            start += n
        return parts


def load_digits(path: Path | None = None) -> Digits:
    """The digits CSV (``path``, else the zoo's cached copy, fetched once from the scikit-learn wheel)."""
    if path is None:
        from edgeguard import zoo  # noqa: PLC0415 - pip download on first use only

        path = zoo.fetch("digits")
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.float32, max_rows=10_000)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read the digits data {path}: {exc}") from None
    if rows.ndim != 2 or rows.shape[1] != 65:
        raise ConfigError(f"{path}: expected rows of 64 pixels and a label, got shape {rows.shape}")
    x = (rows[:, :64] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    return Digits(x, rows[:, 64].astype(np.int64))


def train_digits_mlp(data: Digits, *, hidden: int = 48, epochs: int = 400, seed: int = 0,
                     ) -> dict[str, np.ndarray]:
    """Weights of a 64-hidden-10 ReLU MLP trained with full-batch Adam and cross-entropy (deterministic)."""
    rng = np.random.default_rng(seed)
    x = data.x.reshape(len(data.y), -1).astype(np.float64)
    onehot = np.eye(10)[data.y]
    params = {
        "w1": rng.normal(0, np.sqrt(2 / 64), (64, hidden)), "b1": np.zeros(hidden),
        "w2": rng.normal(0, np.sqrt(2 / hidden), (hidden, 10)), "b2": np.zeros(10),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    lr, b1, b2, eps, decay = 0.01, 0.9, 0.999, 1e-8, 1e-4
    for t in range(1, epochs + 1):
        h_pre = x @ params["w1"] + params["b1"]
        h = np.maximum(h_pre, 0)
        logits = h @ params["w2"] + params["b2"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        d_logits = (p - onehot) / len(x)
        d_h = (d_logits @ params["w2"].T) * (h_pre > 0)
        grads = {"w2": h.T @ d_logits + decay * params["w2"], "b2": d_logits.sum(0),
                 "w1": x.T @ d_h + decay * params["w1"], "b1": d_h.sum(0)}
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            params[k] -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
    return {k: val.astype(np.float32) for k, val in params.items()}


def mlp_onnx(params: dict[str, np.ndarray]) -> bytes:
    """The trained MLP as ONNX (opset 13, IR 8): Reshape -> MatMul/Add/Relu -> MatMul/Add -> Softmax."""
    try:
        from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415 - publisher-side extra
    except ImportError:
        raise ConfigError("building the digits model needs onnx: pip install 'edgeguard[quantize]'") from None
    inits = [numpy_helper.from_array(params[k], k) for k in ("w1", "b1", "w2", "b2")]
    inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "flat"))
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x64"]),
        helper.make_node("MatMul", ["x64", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeguard")
    model.ir_version = 8
    return bytes(model.SerializeToString())
