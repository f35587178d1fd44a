"""Post-processing: NMS on hand-made boxes, YOLOv8 decoding, top-k, strict declarations."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.engine.postprocess import (
    Postprocessor,
    TopKSpec,
    YoloSpec,
    batched_nms,
    box_iou,
    decode_yolov8,
    nms,
    parse_postprocess,
)
from edgeguard.engine.preprocess import LetterboxTransform
from edgeguard.errors import BackendError, ConfigError

from ._manifests import manifest

A = [0, 0, 10, 10]
B = [1, 1, 11, 11]  # IoU with A = 81 / 119 = 0.68
C = [20, 20, 30, 30]  # far from everything
D = [5, 0, 15, 10]  # IoU with A = 50 / 150 = 0.333


def test_box_iou_known_values() -> None:
    iou = box_iou(np.array([A, A]), np.array([A, B, C, D, [0, 0, 0, 0]]))
    np.testing.assert_allclose(iou[0], [1.0, 81 / 119, 0.0, 50 / 150, 0.0])
    np.testing.assert_allclose(iou[1], iou[0])


def test_nms_suppresses_overlaps_above_threshold_only() -> None:
    boxes = np.array([A, B, C, D], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.45).tolist() == [0, 2, 3]  # B goes (0.68), D stays (0.33)
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]  # now D goes too
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2, 3]
    # Order is by score, not by position.
    assert nms(boxes, np.array([0.1, 0.8, 0.7, 0.6]), 0.45).tolist() == [1, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_batched_nms_keeps_overlapping_boxes_of_other_classes() -> None:
    boxes = np.array([A, B, A, C], dtype=float)
    scores = np.array([0.9, 0.8, 0.85, 0.7])
    classes = np.array([0, 0, 1, 0])
    assert batched_nms(boxes, scores, classes, 0.45).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.45).tolist() == [0, 3]  # class-agnostic: the class-1 copy of A goes


def yolo_output(dets: list[tuple[float, float, float, float, int, float]], classes: int = 3,
                anchors: int = 50) -> np.ndarray:
    """A [1, 4 + classes, anchors] head with the given (cx, cy, w, h, class, score) and noise below 0.1."""
    rng = np.random.default_rng(1)
    out = np.zeros((1, 4 + classes, anchors), np.float32)
    out[0, :4] = rng.uniform(10, 50, size=(4, anchors))
    out[0, 4:] = rng.uniform(0, 0.1, size=(classes, anchors))
    for i, (cx, cy, w, h, cls, score) in enumerate(dets):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def test_decode_yolov8_thresholds_converts_and_suppresses() -> None:
    head = yolo_output([(50, 50, 20, 20, 1, 0.9), (51, 50, 20, 20, 1, 0.8), (50, 50, 20, 20, 2, 0.7),
                        (200, 100, 40, 20, 0, 0.3)])
    boxes, scores, classes = decode_yolov8(head[0], conf=0.25, iou=0.45, max_detections=10)
    assert classes.tolist() == [1, 2, 0]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.3], rtol=1e-6)
    np.testing.assert_allclose(boxes, [[40, 40, 60, 60], [40, 40, 60, 60], [180, 90, 220, 110]])
    _, _, classes = decode_yolov8(head[0], conf=0.25, iou=0.45, max_detections=10, class_agnostic=True)
    assert classes.tolist() == [1, 0]
    _, _, classes = decode_yolov8(head[0], conf=0.5, iou=0.45, max_detections=1)
    assert classes.tolist() == [1]
    boxes, _, _ = decode_yolov8(head[0], conf=0.95, iou=0.45, max_detections=10)
    assert boxes.shape == (0, 4)
    with pytest.raises(BackendError):
        decode_yolov8(np.zeros((4, 10), np.float32), conf=0.25, iou=0.45, max_detections=10)


def test_postprocessor_maps_boxes_back_through_the_letterbox() -> None:
    post = Postprocessor(YoloSpec(output="out", labels=("a", "b", "c")))
    head = yolo_output([(50, 50, 20, 20, 1, 0.9)])
    transform = LetterboxTransform(200, 100, 0.5, 0.5, 0.0, 25.0)  # 200x100 into 100x100, 25 rows of pad
    result = post({"out": head}, transform)
    assert result == {"kind": "detections", "detections": [
        {"class": 1, "label": "b", "score": 0.9, "box": [80.0, 30.0, 120.0, 70.0]}]}
    json.dumps(result)  # JSON-able
    batch = post({"out": np.concatenate([head, head])})
    assert len(batch["batch"]) == 2
    with pytest.raises(BackendError, match="no output 'out'"):
        post({"other": head})


def test_topk_with_labels_and_softmax() -> None:
    post = Postprocessor(TopKSpec(output="logits", k=2, labels=("cat", "dog", "cup"), softmax=True))
    result = post({"logits": np.array([[1.0, 3.0, 2.0]], np.float32)})
    e = np.exp([1.0, 3.0, 2.0]) / np.exp([1.0, 3.0, 2.0]).sum()
    assert result == {"kind": "topk", "top": [
        {"class": 1, "label": "dog", "score": round(float(e[1]), 6)},
        {"class": 2, "label": "cup", "score": round(float(e[2]), 6)}]}
    plain = Postprocessor(TopKSpec(output="logits", k=5))({"logits": np.array([0.2, 0.5], np.float32)})
    assert [t["class"] for t in plain["top"]] == [1, 0] and plain["top"][0]["label"] is None


OUTS = (TensorSpec("out", "float32", (1, 22, 2100)), TensorSpec("logits", "float32", (1, 3)))
BAD = [
    ({"kind": "ssd"}, "postprocess.kind: 'ssd' is not one of topk, yolov8"),
    ({"output": "out"}, "postprocess: missing key 'kind'"),
    ({"kind": "yolov8"}, "postprocess: missing key 'output'"),
    ({"kind": "yolov8", "output": "nope"},
     "postprocess.output: 'nope' is not a declared output (out, logits)"),
    ({"kind": "yolov8", "output": "logits"}, "postprocess.output: yolov8 needs a [1, 4 + classes, N] output; "
     "'logits' is [1, 3]"),
    ({"kind": "topk", "output": "out"}, "postprocess.output: top-k needs a [1, C] or [C] output; 'out' is "
     "[1, 22, 2100]"),
    ({"kind": "yolov8", "output": "out", "labels": ["a"]}, "postprocess.labels: 1 labels for 18 classes in "
     "output 'out'"),
    ({"kind": "yolov8", "output": "out", "conf": 1.5}, "postprocess.conf: 1.5 is outside [0, 1]"),
    ({"kind": "topk", "output": "logits", "k": 0}, "postprocess.k: 0 is outside [1, 1000]"),
    ({"kind": "topk", "output": "logits", "softmax": "yes"}, "postprocess.softmax: expected true or false, "
     "got 'yes'"),
    ({"kind": "topk", "output": "logits", "nms": 0.5}, "postprocess: unknown key 'nms'"),
    (["topk"], "postprocess: expected a JSON object, got list"),
]


@pytest.mark.parametrize(("decl", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_declaration_is_refused_with_exact_message(decl: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_postprocess(manifest((TensorSpec("x", "float32", (1, 3)),), OUTS, postprocess=decl))
    assert str(err.value) == message
