"""How close a quantized model is to its fp32 original, measured the way its output is used.

The kind of output decides the metric (each is a number in [0, 1], higher is better, judged on the worst
held-out sample so one ruined image cannot hide behind an average):

* ``boxes``   — YOLOv8 head ``[1, 4 + nc, N]``: IoU between the fp32 top box and the int8 best box of the same
  class; 0 when a class confidently detected (score >= 0.35) by one model is absent (< 0.15) from the other.
* ``classes`` — ``[1, C]`` scores: the fraction of samples whose top-1 class agrees.
* ``mask``    — ``[1, 1, H, W]`` probability map (a segmenter or text detector): IoU of the masks at 0.3.
* ``sequence`` — ``[1, T, C]`` per-step class probabilities (rows sum to 1: a CTC recogniser such as a CRNN
  OCR model): both outputs are greedy-decoded (argmax, repeats collapsed, blank 0 dropped) and compared by
  edit distance; the value is 1 - (total edits / total fp32 length), the detail counts exact matches.
* ``cosine``  — anything else: cosine similarity of the flattened outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from edgeguard.engine.postprocess import box_iou, decode_yolov8

__all__ = ["OutputKind", "Agreement", "output_kind", "DEFAULT_BUDGETS", "agreement"]

OutputKind = Literal["boxes", "classes", "mask", "sequence", "cosine"]
DEFAULT_BUDGETS: Final[dict[str, float]] = {"boxes": 0.9, "classes": 0.9, "mask": 0.8, "sequence": 0.95,
                                             "cosine": 0.99}
_BOX_LOW: Final = 0.15
_BOX_HIGH: Final = 0.35
_MASK_THRESHOLD: Final = 0.3


@dataclass(frozen=True)
class Agreement:
    kind: OutputKind
    metric: str  # what ``value`` measures, for the report
    value: float  # in [0, 1], higher is better
    detail: str  # e.g. the sample that did worst


def output_kind(shape: Sequence[int], sample: np.ndarray) -> OutputKind:
    """Guess the output kind from its static shape and one fp32 value of it."""
    dims = tuple(shape)
    # Checked before boxes: a CTC output [1, T, C] has the same rank and T < C, but its rows are softmaxes.
    if len(dims) == 3 and dims[0] == 1 and dims[1] >= 1 and dims[2] >= 2 and sample.size \
            and float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0 \
            and bool(np.allclose(sample.sum(axis=-1), 1.0, atol=1e-3)):
        return "sequence"
    if len(dims) == 3 and dims[0] == 1 and 5 <= dims[1] < dims[2]:
        return "boxes"
    if len(dims) == 2 and dims[0] == 1 and dims[1] >= 2:
        return "classes"
    if len(dims) == 4 and dims[0] == 1 and dims[1] == 1 and float(sample.min()) >= 0.0 \
            and float(sample.max()) <= 1.0:
        return "mask"
    return "cosine"


def _detect(output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return decode_yolov8(output[0], conf=_BOX_LOW, iou=0.45, max_detections=100)


def _boxes(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    worst, worst_at, judged = 1.0, "", 0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        r_boxes, r_scores, r_classes = _detect(r)
        g_boxes, g_scores, g_classes = _detect(g)
        # Hysteresis: a class counts as detected at >= _BOX_HIGH and as present at >= _BOX_LOW, so a score
        # that drifts from 0.24 to 0.26 across the 0.25 threshold is not a disagreement.
        r_sure = set(r_classes[r_scores >= _BOX_HIGH][:5].tolist())
        g_sure = set(g_classes[g_scores >= _BOX_HIGH][:5].tolist())
        if r_sure - set(g_classes.tolist()):
            value, reason = 0.0, f"int8 misses class {sorted(r_sure - set(g_classes.tolist()))[0]}"
        elif g_sure - set(r_classes.tolist()):
            value, reason = 0.0, f"int8 invents class {sorted(g_sure - set(r_classes.tolist()))[0]}"
        elif not r_sure:
            value, reason = 1.0, "no confident detection in either"
        else:
            same = g_classes == r_classes[0]
            value = float(box_iou(r_boxes[:1], g_boxes[same]).max()) if same.any() else 0.0
            reason = f"top-box IoU {value:.3f}"
            judged += 1
        if value < worst or not worst_at:
            worst, worst_at = value, f"sample {i}: {reason}"
    return Agreement("boxes", "min top-box IoU (same classes)", worst,
                     f"{worst_at}; {judged} samples with confident detections")


def _classes(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    agree = [int(np.argmax(r)) == int(np.argmax(g)) for r, g in zip(ref, got, strict=True)]
    value = float(np.mean(agree))
    return Agreement("classes", "top-1 agreement", value, f"{sum(agree)}/{len(agree)} samples agree")


def _mask(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    worst, worst_at = 1.0, ""
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        rm, gm = r > _MASK_THRESHOLD, g > _MASK_THRESHOLD
        union = int((rm | gm).sum())
        value = 1.0 if union == 0 else int((rm & gm).sum()) / union
        if value < worst:
            worst, worst_at = value, f"sample {i}: mask IoU {value:.3f}"
    return Agreement("mask", f"min mask IoU at {_MASK_THRESHOLD}", worst, worst_at or "all masks agree")


def _cosine(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    worst, worst_at = 1.0, ""
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        a, b = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        value = (1.0 if float(np.abs(a - b).max(initial=0.0)) == 0.0 else 0.0) if denom == 0 \
            else float(np.dot(a, b) / denom)
        if not np.isfinite(value):
            value = 0.0
        if value < worst:
            worst, worst_at = value, f"sample {i}: cosine {value:.4f}"
    return Agreement("cosine", "min cosine similarity", max(0.0, worst), worst_at or "all outputs agree")


def _ctc_decode(probs: np.ndarray) -> list[int]:
    best = probs.reshape(-1, probs.shape[-1]).argmax(axis=-1)
    out: list[int] = []
    previous = -1
    for label in best.tolist():
        if label not in (previous, 0):
            out.append(label)
        previous = label
    return out


def _edits(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (two rows: sequences here are a few dozen symbols)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _sequence(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    edits = length = exact = 0
    for r, g in zip(ref, got, strict=True):
        a, b = _ctc_decode(r), _ctc_decode(g)
        edits += _edits(a, b)
        length += len(a)
        exact += a == b
    value = max(0.0, 1.0 - edits / max(length, 1))
    return Agreement("sequence", "1 - edit distance / length (CTC greedy)", value,
                     f"{exact}/{len(ref)} sequences identical, {edits} edits in {length} symbols")


def agreement(kind: OutputKind, ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> Agreement:
    """How well ``got`` (int8 outputs) agrees with ``ref`` (fp32 outputs), sample by sample."""
    if kind == "boxes":
        return _boxes(ref, got)
    if kind == "classes":
        return _classes(ref, got)
    if kind == "mask":
        return _mask(ref, got)
    if kind == "sequence":
        return _sequence(ref, got)
    return _cosine(ref, got)
