"""Quantizer parts: candidate discovery, model preparation, calibration loading, agreement metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgeguard import zoo
from edgeguard.errors import ConfigError
from edgeguard.quantize import find_candidates, load_calibration, output_kind
from edgeguard.quantize._metrics import agreement
from edgeguard.quantize._prepare import prepare_model

from ._models import head_model


def test_candidates_grow_from_the_output_tail() -> None:
    cands = {c.name: set(c.exclude) for c in find_candidates(head_model())}
    assert cands == {
        "int8": set(),
        "fp32-tail": {"Sigmoid"},
        "fp32-head": {"Sigmoid", "Add2"},
        "fp32-head+last": {"Sigmoid", "Add2", "ConvLast"},
        # Whole-model variants; no "dynamic": the graph has no MatMul/Gemm/LSTM/GRU.
        "int8-s8s8": set(),
        "int8-compute-only": set(),
    }


def test_anonymous_nodes_get_names_so_they_can_be_excluded() -> None:
    model = head_model(anonymous=True)
    cands = {c.name: set(c.exclude) for c in find_candidates(model)}
    assert cands["fp32-tail"] == {"edgeguard_node_5"}
    assert model.graph.node[5].name == "edgeguard_node_5"


def test_yolov8n_head_is_found_without_node_lists(yolov8n_path: Path) -> None:
    cands = {c.name: c.exclude for c in find_candidates(onnx.load(str(yolov8n_path)))}
    tail = set(cands["fp32-tail"])
    # The last Concat (boxes 0..320 next to scores 0..1) and the class-score Sigmoid are in the tail.
    assert "/model.22/Concat_25" in tail and "/model.22/Sigmoid" in tail
    assert not any(name.endswith("/Conv") for name in tail)
    assert "/model.22/dfl/conv/Conv" in cands["fp32-head+last"]


def test_prepare_upgrades_opset_and_fixes_shapes(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(head_model(opset=12, dynamic=True), str(src))
    with pytest.raises(ConfigError) as err:
        prepare_model(src, tmp_path)
    assert str(err.value) == ("input 'x' has dynamic axes [?, 3, ?, ?]: give a static shape with "
                              "--input-shape x=1,3,H,W (or the calibration .npz shape)")
    with pytest.raises(ConfigError) as err:
        prepare_model(src, tmp_path, shapes={"x": (1, 4, 8, 8)})
    assert str(err.value) == "--input-shape [1, 4, 8, 8] does not fit input 'x' [?, 3, ?, ?]"
    with pytest.raises(ConfigError, match=r"^--input-shape names 'y', the model's inputs are x$"):
        prepare_model(src, tmp_path, shapes={"y": (1, 3, 8, 8)})
    prepared = prepare_model(src, tmp_path, shapes={"x": (1, 3, 8, 8)})
    assert (prepared.opset_from, prepared.opset) == (12, 13)
    assert prepared.inputs == {"x": (1, 3, 8, 8)}
    dims = [d.dim_value for d in onnx.load(str(prepared.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 8, 8]


def test_prepare_refuses_what_is_not_an_onnx_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xff")
    with pytest.raises(ConfigError, match=r"bad.onnx: not a readable ONNX model"):
        prepare_model(bad, tmp_path)


def test_calibration_from_npz_in_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stacked = tmp_path / "stacked.npz"
    np.savez(stacked, x=rng.random((8, 3, 8, 8), dtype=np.float32))
    data = load_calibration(stacked, {"x": (1, 3, 8, 8)})
    assert (len(data.calibration), len(data.held_out)) == (6, 2)
    assert data.held_out[0]["x"].shape == (1, 3, 8, 8)
    golden = tmp_path / "golden.npz"
    arrays: dict[str, Any] = {f"{i}/in/x": rng.random((1, 3, 8, 8), dtype=np.float32) for i in range(4)}
    arrays.update({f"{i}/out/y": np.zeros(2, np.float32) for i in range(4)})
    np.savez(golden, **arrays)
    data = load_calibration(golden, {"x": (1, 3, 8, 8)})
    assert (len(data.calibration), len(data.held_out)) == (3, 1)


BAD_NPZ = [
    ({"x": np.zeros((2, 3, 4, 4), np.float32)},
     "sample 0 input 'x' has shape (1, 3, 4, 4), the model takes [1, 3, 8, 8] (pass --input-shape)"),
    ({"0/in/z": np.zeros((1, 3, 8, 8), np.float32)}, "sample 0 lacks an input of x"),
    ({"weights": np.zeros(3)},
     "no samples (expected arrays named after the inputs x or '<i>/in/<name>' keys)"),
]


@pytest.mark.parametrize(("arrays", "message"), BAD_NPZ, ids=[m for _, m in BAD_NPZ])
def test_bad_npz_is_refused(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as err:
        load_calibration(path, {"x": (1, 3, 8, 8)})
    assert str(err.value) == f"{path}: {message}"


def test_calibration_from_images_is_augmented_and_holds_out_originals(tmp_path: Path) -> None:
    for key in ("astronaut.png", "coffee.png"):
        (tmp_path / key).write_bytes(zoo.fetch(key).read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_calibration(tmp_path, {"images": (1, 3, 64, 64)}, samples=16)
    assert len(data.held_out) == 4 and len(data.calibration) == 12
    assert all(s["images"].shape == (1, 3, 64, 64) for s in data.calibration)
    assert "2 images" in data.source
    with pytest.raises(ConfigError, match=r"notes.txt: expected a folder of images or raw files, or an .npz"):
        load_calibration(tmp_path / "notes.txt", {"images": (1, 3, 64, 64)})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: no .png/.jpg images to calibrate on$"):
        load_calibration(empty, {"images": (1, 3, 64, 64)})


def test_metric_kinds_and_values() -> None:
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal((1, 10)).astype(np.float32) for _ in range(4)]
    assert output_kind((1, 10), logits[0]) == "classes"
    flipped = [x.copy() for x in logits]
    flipped[0][0, int(np.argmax(flipped[0]))] = -100
    assert agreement("classes", logits, logits).value == 1.0
    assert agreement("classes", logits, flipped).value == 0.75
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[0, 0, :4, :4] = 0.9
    half = mask.copy()
    half[0, 0, :2] = 0.0
    assert output_kind((1, 1, 8, 8), mask) == "mask"
    assert agreement("mask", [mask], [half]).value == 0.5
    assert agreement("mask", [np.zeros_like(mask)], [np.zeros_like(mask)]).value == 1.0
    assert output_kind((1, 4, 8), rng.standard_normal((1, 4, 8))) == "cosine"
    assert agreement("cosine", [mask], [-mask]).value == 0.0
    assert agreement("cosine", [mask], [mask * 2]).value == pytest.approx(1.0)


def test_box_metric() -> None:
    head = np.zeros((1, 6, 20), np.float32)
    head[0, :4] = 1.0
    head[0, :4, 0] = (50, 50, 20, 20)
    head[0, 4, 0] = 0.9
    assert output_kind((1, 6, 20), head) == "boxes"
    shifted = head.copy()
    shifted[0, 0, 0] = 52  # IoU 18*20 / (22*20) = 0.818
    assert agreement("boxes", [head], [shifted]).value == pytest.approx(360 / 440)
    collapsed = head.copy()
    collapsed[0, 4:] = 0.0  # every score gone: the class is missed
    result = agreement("boxes", [head], [collapsed])
    assert result.value == 0.0 and "int8 misses class 0" in result.detail
    invented = np.zeros_like(head)
    invented[0, :4] = 1.0
    assert agreement("boxes", [invented], [head]).value == 0.0
    borderline = head.copy()
    borderline[0, 4, 0] = 0.3  # below "sure" in int8 but still present: not a disagreement
    assert agreement("boxes", [head], [borderline]).value == 1.0
