"""Copies of a real ONNX model for the fingerprint tests: weights scaled by random factors near 1 (a
"fine-tuned" or tampered copy) or permuted within each tensor (same architecture and weight statistics,
none of the learned function)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def derived_copy(src: Path, dst: Path, *, noise: float = 0.0, permute: bool = False, seed: int = 1) -> Path:
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    # Weights live in initializers (most exporters) or Constant nodes (paddle2onnx).
    tensors = list(model.graph.initializer) + [
        a.t for node in model.graph.node if node.op_type == "Constant"
        for a in node.attribute if a.name == "value"
    ]
    for tensor in tensors:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype.kind != "f" or weights.size < 16:
            continue
        if permute:
            changed = rng.permutation(weights.ravel()).reshape(weights.shape)
        else:
            # Multiplicative: every weight moves by about ``noise`` of itself and keeps its sign (additive
            # noise turns batch-norm variances stored as weights negative, and the model into NaNs).
            changed = weights * (1.0 + rng.normal(0.0, noise, weights.shape))
        tensor.CopyFrom(numpy_helper.from_array(changed.astype(weights.dtype), tensor.name))
    onnx.save(model, str(dst))
    return dst
