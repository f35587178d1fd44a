"""The quantizer on models it was not built with: integer inputs, raw-file calibration, preparation that
degrades, guarded candidates, honest "kept fp32", already-quantized input, failures that name their stage.

Small generated models run through the real onnxruntime quantizer and the real CLI; the real models from
PyPI wheels are in test_suite.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeguard.cli import main
from edgeguard.errors import ConfigError
from edgeguard.quantize import QuantizeOptions, load_calibration, quantize_onnx
from edgeguard.quantize._metrics import agreement, output_kind
from edgeguard.quantize._quantizer import _culprits

from ._models import classifier_model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def token_model(path: Path, *, dtype: int = TensorProto.INT64, vocab: int = 256, length: int = 32) -> Path:
    """ids [1, L] (integer) -> Gather(embedding) -> MatMul -> ReduceMean -> Gemm: logits [1, 6]."""
    rng = np.random.default_rng(5)
    ids = helper.make_tensor_value_info("ids", dtype, ["N", length])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="Embed"),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="Proj"),
        helper.make_node("Relu", ["h"], ["r"], name="Act"),
        helper.make_node("ReduceMean", ["r", "axes"], ["p"], name="Pool", keepdims=0),
        helper.make_node("Gemm", ["p", "w2", "b2"], ["logits"], name="Head", transB=1),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, 16)).astype(np.float32), "emb"),
        numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array((rng.standard_normal((6, 32)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(6, np.float32), "b2"),
    ]
    graph = helper.make_graph(nodes, "tokens", [ids], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_integer_input_model_is_calibrated_with_its_own_ids(tmp_path: Path) -> None:
    model = token_model(tmp_path / "tokens.onnx")
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 256, (12, 32), dtype=np.int64))
    out = tmp_path / "tokens-int8.onnx"
    report = quantize_onnx(model, calib, out, options=QuantizeOptions(bench_runs=3, min_speedup=0.01))
    # The batch axis came from the .npz; the ids stay int64 and only float tensors got QDQ.
    assert report.input_shapes == {"ids": (1, 32)}
    assert report.kinds == ("classes",)
    assert report.chosen is not None, report.reason
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "ids" not in quantized


def test_float_values_for_an_integer_input_are_refused_in_one_line(tmp_path: Path) -> None:
    model = token_model(tmp_path / "tokens.onnx")
    calib = tmp_path / "floats.npz"
    np.savez(calib, ids=np.random.default_rng(0).random((8, 32)))
    with pytest.raises(ConfigError) as err:
        quantize_onnx(model, calib, tmp_path / "o.onnx", options=QuantizeOptions(bench_runs=3))
    assert str(err.value) == (f"{calib}: sample 0 input 'ids' holds float64 values, the model takes int64 "
                              "(store the integer values themselves)")
    assert not (tmp_path / "o.onnx").exists()


def test_raw_files_calibrate_a_byte_model(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    for i, name in enumerate(("a.py", "b.md", "c.bin", "d.png")):
        (folder / name).write_bytes(bytes(range(i, 256)) * (i + 1) + Path(__file__).read_bytes())
    data = load_calibration(folder, {"ids": (1, 64)}, dtypes={"ids": "int32"}, samples=16)
    assert all(s["ids"].dtype == np.int32 and s["ids"].shape == (1, 64) for s in data.calibration)
    assert len(data.held_out) >= 1 and "4 raw files" in data.source
    assert int(max(s["ids"].max() for s in data.calibration)) <= 255
    model = token_model(tmp_path / "bytes.onnx", dtype=TensorProto.INT32, length=64)
    code = main(["quantize", str(model), "--calibration", str(folder), "-o", str(tmp_path / "q.onnx"),
                 "--bench-runs", "3", "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert "raw files" in report["calibration"]
    with pytest.raises(ConfigError, match=r"raw files feed only an integer input of shape \[1, L\] or \[L\]"):
        load_calibration(folder, {"ids": (2, 64)}, dtypes={"ids": "int32"})


def inverse_model(path: Path) -> Path:
    """Conv -> com.microsoft Inverse: onnxruntime runs it, its symbolic shape inference cannot follow it."""
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    eye = np.zeros((4, 4, 1, 1), np.float32)
    eye[range(4), range(4)] = 1.0
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="Conv"),
        helper.make_node("Inverse", ["c"], ["y"], name="Inverse", domain="com.microsoft"),
    ]
    w = eye + (rng.standard_normal((4, 4, 1, 1)) * 0.05).astype(np.float32)
    graph = helper.make_graph(nodes, "inverse", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return _save(model, path)


def test_symbolic_shape_inference_failure_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # onnxruntime drops a partial model in the current directory on failure
    model = inverse_model(tmp_path / "inv.onnx")
    calib = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=(np.eye(8, dtype=np.float32) * 2 + rng.random((8, 4, 8, 8), dtype=np.float32) * 0.1))
    out = tmp_path / "inv-q.onnx"
    code = main(["quantize", str(model), "--calibration", str(calib), "-o", str(out), "--bench-runs", "3",
                 "--report", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "preparation: symbolic shape inference failed (Exception: Incomplete symbolic shape inference); " \
           "used ONNX shape inference" in printed
    assert out.is_file()
    assert not (tmp_path / "sym_shape_infer_temp.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["preparation"][0].startswith("symbolic shape")


def test_every_candidate_is_measured_and_progress_is_reported(tmp_path: Path) -> None:
    model = token_model(tmp_path / "tokens.onnx")
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 256, (8, 32), dtype=np.int64))
    seen: list[str] = []
    report = quantize_onnx(model, calib, None, options=QuantizeOptions(bench_runs=3),
                           progress=lambda what, _done, _total: seen.append(what))
    names = [c.name for c in report.candidates]
    assert {"int8", "int8-s8s8", "int8-compute-only", "dynamic"} <= set(names)
    for cand in report.candidates:
        assert cand.error or (cand.latency_ms and cand.agreements), cand
        assert any(f": {cand.name} (" in line for line in seen), (cand.name, seen)
    assert next(c for c in report.candidates if c.name == "dynamic").method == "dynamic"


def cancelling_model(path: Path) -> Path:
    """y = Conv(x, I + 1e-3 R) - x: the output is the tiny remainder, which no int8 Conv can keep."""
    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    w = np.zeros((4, 4, 1, 1), np.float32)
    w[range(4), range(4)] = 1.0
    w += (rng.standard_normal((4, 4, 1, 1)) * 1e-3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="Conv"),
             helper.make_node("Sub", ["c", "x"], ["y"], name="Sub")]
    graph = helper.make_graph(nodes, "cancel", [x], [y], [numpy_helper.from_array(w, "w")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_no_candidate_within_budget_keeps_fp32_and_says_so(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Every int8 candidate loses the output (cosine far below 0.99): fp32 is kept and written, exit 0."""
    model = cancelling_model(tmp_path / "cancel.onnx")
    calib = tmp_path / "x.npz"
    np.savez(calib, x=np.random.default_rng(1).random((8, 4, 8, 8), dtype=np.float32) + 1.0)
    out = tmp_path / "out.onnx"
    code = main(["quantize", str(model), "--calibration", str(calib), "-o", str(out), "--bench-runs", "3",
                 "--report", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "choice: kept fp32: best candidate " in printed and "x fp32, min cosine similarity" in printed
    assert "wrote the original fp32 model to" in printed
    assert out.read_bytes() == model.read_bytes()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kept_fp32"] is True and report["chosen"] is None and report["method"] == "kept fp32"
    # A candidate that ends up quantizing nothing is not an int8 model: it must not win as one.
    nothing = [c for c in report["candidates"] if c["error"] and "quantized nothing" in c["error"]]
    assert [c["name"] for c in nothing] == ["fp32-head+last"]
    assert all(not c["passes"] for c in report["candidates"])


def test_already_quantized_onnx_is_accepted_as_it_is(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model = classifier_model(tmp_path / "cls.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32))
    int8 = tmp_path / "cls-int8.onnx"
    quantize_onnx(model, calib, int8, options=QuantizeOptions(bench_runs=3, budget=0.0, min_speedup=0.01))
    out = tmp_path / "again.onnx"
    assert main(["quantize", str(int8), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cls-int8.onnx: already quantized ONNX (" in printed
    assert "QuantizeLinear): accepted as is" in printed
    assert out.read_bytes() == int8.read_bytes()
    with pytest.raises(ConfigError, match=r"already quantized \(.*\): nothing to quantize$"):
        quantize_onnx(int8, calib, None, options=QuantizeOptions(bench_runs=3))


def test_a_stage_that_cannot_run_fails_in_one_line_naming_it(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Ids beyond the embedding table: fp32 itself cannot run on the data."""
    model = token_model(tmp_path / "tokens.onnx", vocab=16)
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=np.full((8, 32), 99, dtype=np.int64))
    code = main(["quantize", str(model), "--calibration", str(calib), "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("edgeguard: running the prepared fp32 model on the held-out samples failed: ")


def test_nodes_named_by_a_quantizer_error_are_found(tmp_path: Path) -> None:
    model = onnx.load(str(token_model(tmp_path / "t.onnx")))
    assert _culprits(KeyError("w1_scale"), model.graph) == {"Proj"}
    assert _culprits(RuntimeError("running DequantizeLinear node. Name:'r_DequantizeLinear' failed"),
                     model.graph) == {"Act", "Pool"}
    assert _culprits(ValueError("no names here"), model.graph) == set()


def test_sequence_outputs_are_judged_by_edit_distance() -> None:
    def probs(labels: list[int], classes: int = 6) -> np.ndarray:
        out = np.full((1, len(labels), classes), 0.01, np.float32)
        out[0, range(len(labels)), labels] = 1.0 - 0.01 * (classes - 1)
        return out

    ref = probs([1, 1, 0, 2, 3, 0, 3])  # decodes to 1 2 3 3
    assert output_kind(ref.shape, ref) == "sequence"
    assert agreement("sequence", [ref], [ref]).value == 1.0
    one_off = probs([1, 1, 0, 2, 4, 0, 3])  # 1 2 4 3: one substitution in four
    result = agreement("sequence", [ref, ref], [ref, one_off])
    assert result.value == pytest.approx(1 - 1 / 8)
    assert result.detail == "1/2 sequences identical, 1 edits in 8 symbols"
    # A YOLO head of the same rank is still boxes: its rows are not probability distributions.
    head = np.random.default_rng(0).random((1, 22, 2100)).astype(np.float32)
    assert output_kind(head.shape, head) == "boxes"


def test_a_small_speed_up_is_timed_again_before_it_is_kept(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The first timing says every candidate is 1.1x; timed again, none is faster: fp32 is kept."""
    from edgeguard.quantize import _quantizer

    rounds: list[list[str]] = []

    def scripted(sessions: dict[str, object], sample: object, runs: int) -> dict[str, float]:
        rounds.append(list(sessions))
        first = len(rounds) == 1
        return {name: 1.0 if name == "fp32" else (0.9 if first else 1.2) for name in sessions}

    monkeypatch.setattr(_quantizer, "_bench", scripted)
    model = token_model(tmp_path / "tokens.onnx")
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 256, (8, 32), dtype=np.int64))
    out = tmp_path / "tokens-int8.onnx"
    report = quantize_onnx(model, calib, out, options=QuantizeOptions(bench_runs=3))
    assert report.kept_fp32, report.reason
    assert not out.exists() and report.output is None  # the API writes no fp32 model to an int8 path
    assert len(rounds) == 4 and all(len(r) == 2 for r in rounds[1:])  # three confirmations, one each
    unconfirmed = [c for c in report.candidates if any("speed-up not confirmed" in n for n in c.notes)]
    assert len(unconfirmed) == 3 and all(c.speedup == pytest.approx(1 / 1.2) for c in unconfirmed)
    assert report.reason.startswith("kept fp32: best candidate ")
