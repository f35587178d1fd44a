"""Getting an fp32 ONNX model ready for static QDQ quantization.

onnxruntime's quantizer wants three things the models users bring often lack: static input shapes (dynamic
batch or image size makes calibration ranges and shape inference unreliable), opset >= 13 (per-channel QDQ
needs the ``axis`` attribute of QuantizeLinear) and inferred intermediate shapes (``quant_pre_process``, which
also folds constants and fuses what it can). This module does all three and says clearly when it cannot.

Preparation degrades instead of failing, because models users bring often defeat one step or another:

* symbolic shape inference (``quant_pre_process``'s first pass) cannot follow every graph (a CRNN's dynamic
  width through recurrent layers): then ``quant_pre_process`` runs again with ``skip_symbolic_shape=True``
  (ONNX's own shape inference), and if that fails too, only ``onnx.shape_inference`` runs, without the
  optimizer pass. ``PreparedModel.steps`` says which path was taken;
* inputs of any dtype are kept as they are: integer inputs (token ids, bytes, indices) are fed with their own
  calibration data, and only float tensors inside the graph get QDQ;
* a model that is already quantized (QDQ pairs or integer-arithmetic operators) is recognised by
  ``quantized_nodes`` so the caller can say so instead of quantizing it twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

from edgeguard.errors import ConfigError

from ._errors import QuantizeError

__all__ = ["PreparedModel", "prepare_model", "input_shapes", "quantized_nodes", "QUANTIZED_OPS", "read_model"]

MIN_OPSET = 13
_MAX_MODEL_BYTES = 2 * 1024**3 - 1  # protobuf's limit without external data


@dataclass(frozen=True)
class PreparedModel:
    path: Path  # the fp32 model, static shapes, opset >= 13, shape-inferred
    inputs: dict[str, tuple[int, ...]]  # static input shapes
    input_dtypes: dict[str, str]
    outputs: tuple[str, ...]
    opset_from: int
    opset: int
    steps: tuple[str, ...] = ()  # how preparation went, e.g. "symbolic shape inference failed: ..."


# Operators that only appear in a model someone already quantized (QDQ format or integer arithmetic).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeLSTM",
})


def quantized_nodes(model: Any) -> dict[str, int]:
    """Count of each quantized operator in ``model`` (empty: not quantized)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


_ONNX_TO_NUMPY = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                  10: "float16", 11: "float64"}


def input_shapes(model: Any) -> dict[str, tuple[int | None, ...]]:
    """Declared input shapes of an ``onnx.ModelProto`` (``None``: dynamic axis), initializers excluded."""
    inits = {init.name for init in model.graph.initializer}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                   for d in dims)
    return shapes


def _show(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def resolve_shapes(
    declared: Mapping[str, tuple[int | None, ...]], overrides: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Static shapes: the declared ones, ``overrides`` where given, a dynamic batch axis set to 1."""
    for name in overrides:
        if name not in declared:
            raise ConfigError(f"--input-shape names {name!r}, the model's inputs are {', '.join(declared)}")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in declared.items():
        if name in overrides:
            fixed = tuple(int(v) for v in overrides[name])
            if len(fixed) != len(shape) or any(v < 1 for v in fixed) or any(
                d is not None and d != v for d, v in zip(shape, fixed, strict=True)
            ):
                raise ConfigError(f"--input-shape {list(fixed)} does not fit input {name!r} {_show(shape)}")
            out[name] = fixed
            continue
        dims = [1 if (axis == 0 and d is None) else d for axis, d in enumerate(shape)]
        if any(d is None for d in dims):
            raise ConfigError(f"input {name!r} has dynamic axes {_show(shape)}: give a static shape with "
                              f"--input-shape {name}=1,3,H,W (or the calibration .npz shape)")
        out[name] = tuple(int(d) for d in dims if d is not None)
    return out


def _load(source: Path) -> Any:
    if source.stat().st_size > _MAX_MODEL_BYTES:
        raise ConfigError(f"{source}: models over 2 GiB (external data) are not supported")
    try:
        return onnx.load(str(source))
    except Exception as exc:
        raise ConfigError(f"{source}: not a readable ONNX model: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _infer_shapes(fixed: Path, prepared: Path) -> list[str]:
    """``quant_pre_process`` with symbolic shape inference, then without it, then ONNX shape inference alone.

    Returns what happened, one entry per fallback taken; raises the last failure when every way failed.
    """
    steps: list[str] = []
    # On failure onnxruntime's symbolic inference saves its partial model to this name in the current
    # directory; remove what it left there unless the file was the user's to begin with.
    litter = Path("sym_shape_infer_temp.onnx")
    had_litter = litter.exists()
    try:
        quant_pre_process(str(fixed), str(prepared), skip_symbolic_shape=False)
        return steps
    except Exception as exc:
        steps.append(f"symbolic shape inference failed ({_first_line(exc)}); used ONNX shape inference")
        if not had_litter:
            litter.unlink(missing_ok=True)
    try:
        quant_pre_process(str(fixed), str(prepared), skip_symbolic_shape=True)
        return steps
    except Exception as exc:
        steps.append(f"pre-processing without symbolic shapes failed ({_first_line(exc)}); "
                     "used ONNX shape inference without optimization")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fixed)))
    onnx.save(model, str(prepared))
    return steps


def _fix_input(model: Any, name: str, shape: Sequence[int]) -> None:
    """Make input ``name`` static. onnxruntime's helper replaces a named dynamic axis everywhere it occurs,
    which fails when one name stands for two sizes (PP-OCR's classifier calls both height and width "?");
    then the input's own dims are set and the stale intermediate shapes dropped for inference to redo."""
    try:
        make_input_shape_fixed(model.graph, name, list(shape))
        return
    except ValueError:
        pass
    value = next(v for v in model.graph.input if v.name == name)
    for dim, size in zip(value.type.tensor_type.shape.dim, shape, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    del model.graph.value_info[:]


def prepare_model(
    source: Path, work_dir: Path, *, shapes: Mapping[str, Sequence[int]] | None = None
) -> PreparedModel:
    """Write ``work_dir/prepared.onnx``: static shapes, opset >= 13, shapes inferred."""
    model = _load(source)
    done = quantized_nodes(model)
    if done:
        found = ", ".join(f"{n} {op}" for op, n in sorted(done.items()))
        raise ConfigError(f"{source}: already quantized ({found}): nothing to quantize")
    static = resolve_shapes(input_shapes(model), shapes or {})
    opset_from = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    stage = "upgrading the opset"
    early: list[str] = []
    try:
        if opset_from < MIN_OPSET:
            # Per-channel QDQ needs QuantizeLinear's axis attribute (opset 13).
            model = version_converter.convert_version(model, MIN_OPSET)
        stage = "fixing the input shapes"
        for name, shape in static.items():
            _fix_input(model, name, shape)
        try:
            fix_output_shapes(model)
        except Exception as exc:
            # Only a convenience: shape inference below works out the output shapes it can anyway.
            early.append(f"output shapes left as declared ({_first_line(exc)})")
        fixed = work_dir / "fixed.onnx"
        onnx.save(model, str(fixed))
        stage = "inferring shapes"
        prepared = work_dir / "prepared.onnx"
        steps = early + _infer_shapes(fixed, prepared)
        final = onnx.load(str(prepared))
    except Exception as exc:
        raise QuantizeError(f"preparing {source.name} failed while {stage}: {_first_line(exc)}") from None
    dtypes = {}
    for value in final.graph.input:
        if value.name in static:
            dtypes[value.name] = _ONNX_TO_NUMPY.get(value.type.tensor_type.elem_type, "unsupported")
    for name, dtype in dtypes.items():
        if dtype == "unsupported":
            raise ConfigError(f"input {name!r} has a dtype the quantizer cannot feed (supported: "
                              f"{', '.join(sorted(set(_ONNX_TO_NUMPY.values())))})")
    opset = next((o.version for o in final.opset_import if o.domain in ("", "ai.onnx")), 0)
    return PreparedModel(
        path=prepared,
        inputs=static,
        input_dtypes=dtypes,
        outputs=tuple(o.name for o in final.graph.output),
        opset_from=opset_from,
        opset=opset,
        steps=tuple(steps),
    )


def read_model(source: Path) -> Any:
    """The ``onnx.ModelProto`` at ``source`` (``ConfigError`` when it is too large or unreadable)."""
    return _load(source)
