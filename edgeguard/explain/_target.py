"""What the heatmap explains: one number per forward pass that measures "the same answer".

- yolov8 detections (manifest postprocess ``yolov8``): the top box of the image itself, class ``c``; the
  score of an occluded copy is ``max_n score_c[n] * IoU(box_n, top box)`` over every raw candidate,
  continuous where the thresholded detections would jump;
- ``topk`` classification: the top class's score (softmax when declared);
- anything else: the value of the last output at the position where the image itself peaks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.engine.postprocess import Postprocessor, TopKSpec, YoloSpec, box_iou, decode_yolov8
from edgeguard.engine.preprocess import LetterboxTransform

__all__ = ["Target", "choose_target"]


@dataclass(frozen=True)
class Target:
    kind: str  # "box", "class" or "peak"
    output: str
    index: int  # class (box, class) or flat position (peak)
    label: str | None = None
    box: tuple[float, float, float, float] | None = None  # model pixels (box)
    original_box: tuple[float, float, float, float] | None = None  # image pixels (box)
    softmax: bool = False

    def score(self, outputs: Mapping[str, np.ndarray]) -> float:
        raw = np.asarray(outputs[self.output], dtype=np.float64)
        if self.kind == "box":
            assert self.box is not None
            head = raw[0]
            cx, cy, w, h = head[0], head[1], head[2], head[3]
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
            iou = box_iou(np.array(self.box), boxes)
            return float(np.max(head[4 + self.index] * iou.ravel()))
        flat = raw.ravel()
        if self.kind == "class" and self.softmax:
            e = np.exp(flat - flat.max())
            return float(e[self.index] / e.sum())
        return float(flat[self.index])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "output": self.output, "index": self.index}
        if self.label is not None:
            out["label"] = self.label
        if self.original_box is not None:
            out["box"] = [round(v, 1) for v in self.original_box]
        return out


def choose_target(outputs: Mapping[str, np.ndarray], post: Postprocessor | None,
                  transform: LetterboxTransform | None, order: list[str]) -> Target:
    """The answer of the unoccluded image that the heatmap will explain."""
    spec = post.spec if post is not None else None
    if isinstance(spec, YoloSpec):
        head = np.asarray(outputs[spec.output])[0]
        boxes, _scores, classes = decode_yolov8(head, conf=0.0, iou=spec.iou, max_detections=1)
        box = tuple(float(v) for v in boxes[0])
        original = transform.to_original(boxes)[0] if transform is not None else boxes[0]
        c = int(classes[0])
        label = spec.labels[c] if spec.labels is not None and c < len(spec.labels) else None
        return Target("box", spec.output, c, label, box,  # type: ignore[arg-type]
                      tuple(float(v) for v in original))  # type: ignore[arg-type]
    if isinstance(spec, TopKSpec):
        flat = np.asarray(outputs[spec.output]).ravel()
        c = int(np.argmax(flat))
        label = spec.labels[c] if spec.labels is not None and c < len(spec.labels) else None
        return Target("class", spec.output, c, label, softmax=spec.softmax)
    name = order[-1]
    return Target("peak", name, int(np.argmax(np.asarray(outputs[name]).ravel())))
