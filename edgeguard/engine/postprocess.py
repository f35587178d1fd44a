"""Post-processing declared in ``manifest.postprocess``: raw output tensors in, a JSON-able result out.

Two kinds (schema in docs/processing.md):

* ``topk``   — classification: the ``k`` best classes of a ``[1, C]`` (or ``[C]``) score vector, with
  labels.
* ``yolov8`` — detection: decode a YOLOv8 head ``[1, 4 + nc, N]`` (cx, cy, w, h in model pixels, then one
  score per class), keep scores above ``conf``, suppress overlaps class by class (NMS, pure numpy) and map
  the boxes back through the letterbox to original-image pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import BackendError

from ._declarations import DeclReader
from .preprocess import LetterboxTransform

__all__ = [
    "TopKSpec",
    "YoloSpec",
    "PostprocessSpec",
    "Postprocessor",
    "parse_postprocess",
    "box_iou",
    "nms",
    "batched_nms",
    "decode_yolov8",
]

_MAX_K: Final = 1000


@dataclass(frozen=True, kw_only=True)
class TopKSpec:
    output: str
    k: int = 5
    labels: tuple[str, ...] | None = None
    softmax: bool = False  # apply softmax first (for models that output logits)


@dataclass(frozen=True, kw_only=True)
class YoloSpec:
    output: str
    conf: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    class_agnostic: bool = False
    labels: tuple[str, ...] | None = None


PostprocessSpec = TopKSpec | YoloSpec


def parse_postprocess(manifest: Manifest) -> PostprocessSpec | None:
    """Validate ``manifest.postprocess`` against the schema and the declared outputs; ``None`` if absent."""
    if manifest.postprocess is None:
        return None
    r = DeclReader("postprocess", manifest.postprocess)
    kind = r.string("kind", choices=("topk", "yolov8"))
    outputs = {spec.name: spec for spec in manifest.outputs}
    name = r.string("output", next(iter(outputs)) if len(outputs) == 1 else None)
    if name not in outputs:
        raise r.fail("output", f"{name!r} is not a declared output ({', '.join(outputs) or 'none declared'})")
    shape = outputs[name].shape
    labels = r.strings("labels")
    spec: PostprocessSpec
    if kind == "topk":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] not in (None, 1)):
            raise r.fail("output", f"top-k needs a [1, C] or [C] output; {name!r} is {list(shape)}")
        classes = shape[-1]
        spec = TopKSpec(output=name, k=r.integer("k", 5, low=1, high=_MAX_K), labels=labels,
                        softmax=r.boolean("softmax", False))
    else:
        if len(shape) != 3 or shape[0] not in (None, 1) or (shape[1] is not None and shape[1] < 5):
            raise r.fail("output", f"yolov8 needs a [1, 4 + classes, N] output; {name!r} is {list(shape)}")
        classes = None if shape[1] is None else shape[1] - 4
        spec = YoloSpec(
            output=name,
            conf=r.number("conf", 0.25, low=0.0, high=1.0),
            iou=r.number("iou", 0.45, low=0.0, high=1.0),
            max_detections=r.integer("max_detections", 100, low=1, high=10_000),
            class_agnostic=r.boolean("class_agnostic", False),
            labels=labels,
        )
    if labels is not None and classes is not None and len(labels) != classes:
        raise r.fail("labels", f"{len(labels)} labels for {classes} classes in output {name!r}")
    r.finish()
    return spec


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[n, 4]`` and ``[m, 4]`` boxes (x1, y1, x2, y2) as an ``[n, m]`` matrix."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is suppressed when its IoU with a better kept box is strictly greater than ``iou_threshold``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        ious = box_iou(boxes[best:best + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Class-wise NMS: boxes of different classes never suppress each other. Indices, best score first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    # Shift each class into its own region of the plane so one NMS pass cannot mix classes.
    offset = (np.asarray(classes, dtype=np.float64) * (float(np.abs(boxes).max()) + 1.0))[:, None]
    return nms(boxes + offset, scores, iou_threshold)


def decode_yolov8(
    output: np.ndarray, *, conf: float, iou: float, max_detections: int, class_agnostic: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's ``[4 + nc, N]`` YOLOv8 head to ``(boxes xyxy [k, 4], scores [k], classes [k])``."""
    if output.ndim != 2 or output.shape[0] < 5:
        raise BackendError(f"yolov8 output: expected [4 + classes, N], got {list(output.shape)}")
    preds = np.asarray(output, dtype=np.float32)
    class_scores = preds[4:]
    classes = np.argmax(class_scores, axis=0)
    scores = class_scores[classes, np.arange(class_scores.shape[1])]
    mask = scores > conf
    if not mask.any():
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    cx, cy, w, h = preds[0, mask], preds[1, mask], preds[2, mask], preds[3, mask]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float64)
    scores, classes = scores[mask].astype(np.float64), classes[mask].astype(np.int64)
    keep = nms(boxes, scores, iou) if class_agnostic else batched_nms(boxes, scores, classes, iou)
    keep = keep[:max_detections]
    return boxes[keep], scores[keep], classes[keep]


def _label(labels: tuple[str, ...] | None, index: int) -> str | None:
    return labels[index] if labels is not None and 0 <= index < len(labels) else None


class Postprocessor:
    """Applies one ``PostprocessSpec`` to a model's outputs; stateless and thread-safe."""

    def __init__(self, spec: PostprocessSpec) -> None:
        self.spec = spec

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Postprocessor | None:
        spec = parse_postprocess(manifest)
        return None if spec is None else cls(spec)

    def __call__(
        self, outputs: Mapping[str, np.ndarray], transform: LetterboxTransform | None = None
    ) -> dict[str, Any]:
        """The JSON-able result; boxes are in original-image pixels when ``transform`` is given."""
        spec = self.spec
        if spec.output not in outputs:
            raise BackendError(f"postprocess: the model produced no output {spec.output!r}")
        raw = np.asarray(outputs[spec.output])
        if isinstance(spec, TopKSpec):
            rows = raw.reshape(1, -1) if raw.ndim == 1 else raw.reshape(raw.shape[0], -1)
            items = [self._topk(row) for row in rows]
            return {"kind": "topk", "top": items[0]} if len(items) == 1 else {"kind": "topk", "batch": items}
        if raw.ndim != 3:
            raise BackendError(f"postprocess: yolov8 output {spec.output!r} has shape {list(raw.shape)}")
        dets = [self._detections(item, transform) for item in raw]
        if len(dets) == 1:
            return {"kind": "detections", "detections": dets[0]}
        return {"kind": "detections", "batch": dets}

    def _topk(self, row: np.ndarray) -> list[dict[str, Any]]:
        assert isinstance(self.spec, TopKSpec)
        scores = row.astype(np.float64)
        if self.spec.softmax:
            scores = np.exp(scores - scores.max())
            scores /= scores.sum()
        k = min(self.spec.k, scores.size)
        best = np.argsort(-scores, kind="stable")[:k]
        return [
            {"class": int(i), "label": _label(self.spec.labels, int(i)), "score": round(float(scores[i]), 6)}
            for i in best
        ]

    def _detections(self, item: np.ndarray, transform: LetterboxTransform | None) -> list[dict[str, Any]]:
        spec = self.spec
        assert isinstance(spec, YoloSpec)
        boxes, scores, classes = decode_yolov8(
            item, conf=spec.conf, iou=spec.iou, max_detections=spec.max_detections,
            class_agnostic=spec.class_agnostic,
        )
        if transform is not None:
            boxes = transform.to_original(boxes)
        return [
            {
                "class": int(c),
                "label": _label(spec.labels, int(c)),
                "score": round(float(s), 6),
                "box": [round(float(v), 2) for v in box],
            }
            for box, s, c in zip(boxes, scores, classes, strict=True)
        ]
