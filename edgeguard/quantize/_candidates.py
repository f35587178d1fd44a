"""Which nodes to keep in fp32: candidate exclusion sets found from the graph alone, no manual node lists.

Quantization hurts most where values of different meaning or scale meet after the last learned layer: a
detection head that concatenates box coordinates (0..640) with class scores (0..1) gives both one int8 scale
and every score collapses to zero. Such nodes sit *after* the network's last compute layers (Conv, MatMul,
Gemm). So for every node we count the compute layers that still lie between it and an output (the longest
path) and offer growing sets of the nodes near the outputs:

* ``tail``        — non-compute nodes with no compute layer after them (decoding, concatenation, activation);
* ``head``        — non-compute nodes with at most one compute layer after them (the whole detection head);
* ``head+last``   — ``head`` plus the last compute layers themselves.

Besides these structural sets, other ways to quantize the whole model are offered, because which one pays
depends on the model and the machine:

* ``int8-s8s8`` (or ``int8-u8s8`` when ``--activations int8``): the other activation type;
* ``int8-compute-only``: only Conv/ConvTranspose/MatMul/Gemm get QDQ, everything between stays fp32 (fewer
  QuantizeLinear/DequantizeLinear pairs: helps graphs full of element-wise glue);
* ``dynamic``: onnxruntime's dynamic quantization (weights int8, activations quantized at run time) of
  MatMul/Gemm/LSTM/GRU/Attention, offered when the graph has such nodes: it needs no calibration and suits
  recurrent and transformer layers, where static QDQ often cannot be inserted or costs more than it saves.

The accuracy guard measures each and the speed benchmark picks among those that meet the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["Candidate", "COMPUTE_OPS", "DYNAMIC_OPS", "find_candidates"]

COMPUTE_OPS: Final = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
DYNAMIC_OPS: Final = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    exclude: tuple[str, ...]  # node names kept in fp32
    method: Literal["static", "dynamic"] = "static"
    activations: Literal["uint8", "int8"] | None = None  # None: the options' choice
    op_types: tuple[str, ...] | None = None  # None: every operator onnxruntime can quantize


def _compute_after(graph: Any) -> list[int]:
    """For each node (in graph order), the most compute layers on any path from it to a graph output."""
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(index)
    after = [0] * len(nodes)
    # ONNX graphs are topologically sorted, so walking backwards sees every consumer before its producer.
    for index in range(len(nodes) - 1, -1, -1):
        best = 0
        for out in nodes[index].output:
            for c in consumers.get(out, ()):
                best = max(best, after[c] + (1 if nodes[c].op_type in COMPUTE_OPS else 0))
        after[index] = best
    return after


def _op_types(graph: Any) -> set[str]:
    """Operator types in ``graph`` and its subgraphs (If/Loop/Scan branches: silero VAD's LSTM is in one)."""
    found: set[str] = set()
    for node in graph.node:
        found.add(node.op_type)
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                found |= _op_types(sub)
    return found


def find_candidates(model: Any, *, activations: Literal["uint8", "int8"] = "uint8") -> list[Candidate]:
    """Candidates for an ``onnx.ModelProto``: exclusion sets smallest first (duplicates removed), then the
    whole model with the other activation type, compute layers only, and dynamic quantization."""
    graph = model.graph
    nodes = list(graph.node)
    unnamed = [i for i, n in enumerate(nodes) if not n.name]
    if unnamed:
        # nodes_to_exclude works by name: give anonymous nodes stable ones.
        for i in unnamed:
            nodes[i].name = f"edgeguard_node_{i}"
    after = _compute_after(graph)
    compute = [n.op_type in COMPUTE_OPS for n in nodes]
    tail = [n.name for n, a, c in zip(nodes, after, compute, strict=True) if not c and a == 0]
    head = [n.name for n, a, c in zip(nodes, after, compute, strict=True) if not c and a <= 1]
    last = [n.name for n, a, c in zip(nodes, after, compute, strict=True) if c and a == 0]
    options = [
        Candidate("int8", "every node quantized", ()),
        Candidate("fp32-tail", "nodes after the last compute layers kept in fp32", tuple(tail)),
        Candidate("fp32-head", "non-compute nodes of the output head kept in fp32", tuple(head)),
        Candidate("fp32-head+last", "output head and the last compute layers kept in fp32",
                  tuple(head + last)),
    ]
    seen: set[frozenset[str]] = set()
    out: list[Candidate] = []
    for cand in options:
        key = frozenset(cand.exclude)
        if key in seen or (cand.exclude == () and cand.name != "int8"):
            continue
        seen.add(key)
        out.append(cand)
    other: Literal["uint8", "int8"] = "int8" if activations == "uint8" else "uint8"
    label = "s8s8" if other == "int8" else "u8s8"
    out.append(Candidate(f"int8-{label}", f"every node quantized, {other} activations", (),
                         activations=other))
    if any(compute):
        out.append(Candidate("int8-compute-only", "only Conv/MatMul/Gemm quantized, the rest kept fp32", (),
                             op_types=tuple(sorted(COMPUTE_OPS))))
    present = sorted(_op_types(graph) & set(DYNAMIC_OPS))
    if present:
        out.append(Candidate("dynamic", f"dynamic quantization of {'/'.join(present)}", (), method="dynamic",
                             op_types=tuple(present)))
    return out
