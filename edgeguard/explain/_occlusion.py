"""Occlusion sensitivity: how much the model's score for its answer drops when a patch of the image is hidden.

Forward passes only. A window of the image's mean colour slides over a grid; each occluded copy is scored in
batches; a pixel's heat is the mean score drop over the windows that covered it. The number of passes is
``1 + rows * cols`` and never more than ``max_passes``: the stride grows until the grid fits (the cost
bound the API relies on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Heatmap", "Scorer", "occlusion", "plan_grid"]

# Scores a batch of HxWx3 uint8 images (all the size of the original): one float per image.
Scorer = Callable[[list[np.ndarray]], np.ndarray]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Heatmap:
    heat: np.ndarray  # HxW float64, the mean score drop where each pixel was hidden (>= 0)
    base_score: float
    passes: int
    window: int
    stride: int


def plan_grid(height: int, width: int, *, window: int, max_passes: int) -> tuple[int, int]:
    """``(window, stride)`` whose grid needs at most ``max_passes - 1`` occluded passes."""
    if max_passes < 2:
        raise ValueError("max_passes must be at least 2 (the image itself and one occlusion)")
    window = max(1, min(window, height, width))
    stride = max(1, window // 2)
    while _positions(height, window, stride) * _positions(width, window, stride) > max_passes - 1:
        stride += max(1, stride // 4)
        if stride >= max(height, width):
            window = max(height, width)
            stride = window
            break
    return window, stride


def _positions(size: int, window: int, stride: int) -> int:
    return 1 if size <= window else math.ceil((size - window) / stride) + 1


def _starts(size: int, window: int, stride: int) -> list[int]:
    n = _positions(size, window, stride)
    return sorted({min(i * stride, max(0, size - window)) for i in range(n)})


def occlusion(image: np.ndarray, score: Scorer, *, window: int, max_passes: int, batch: int = 8,
              progress: Progress | None = None) -> Heatmap:
    """The occlusion heatmap of ``image`` (HxWx3 uint8) for ``score``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be an HxWx3 uint8 array")
    height, width = image.shape[:2]
    window, stride = plan_grid(height, width, window=window, max_passes=max_passes)
    fill = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    boxes = [(y, x) for y in _starts(height, window, stride) for x in _starts(width, window, stride)]
    say = progress or (lambda _done, _total: None)
    base = float(score([image])[0])
    total = np.zeros((height, width))
    covered = np.zeros((height, width))
    for first in range(0, len(boxes), max(1, batch)):
        chunk = boxes[first:first + max(1, batch)]
        frames = []
        for y, x in chunk:
            frame = image.copy()
            frame[y:y + window, x:x + window] = fill
            frames.append(frame)
        scores = np.asarray(score(frames), dtype=np.float64)
        for (y, x), s in zip(chunk, scores, strict=True):
            total[y:y + window, x:x + window] += base - s
            covered[y:y + window, x:x + window] += 1
        say(first + len(chunk), len(boxes))
    heat = np.clip(total / np.maximum(covered, 1), 0.0, None)
    return Heatmap(heat=heat, base_score=base, passes=1 + len(boxes), window=window, stride=stride)
