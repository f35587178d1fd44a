"""One explanation: the answer of the image itself, then occlusion passes scored against that answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.engine.postprocess import Postprocessor
from edgeguard.engine.preprocess import LetterboxTransform

from ._occlusion import Heatmap, occlusion
from ._target import Target, choose_target

__all__ = ["Explanation", "explain", "Prepare", "RunBatch", "DEFAULT_MAX_PASSES"]

DEFAULT_MAX_PASSES = 257  # the image + a 16x16 grid
Tensors = dict[str, np.ndarray]
Prepare = Callable[[np.ndarray], tuple[Tensors, "LetterboxTransform | None"]]
RunBatch = Callable[[Sequence[Tensors]], list[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class Explanation:
    heatmap: Heatmap
    target: Target

    def summary(self, *, cells: int = 16) -> dict[str, Any]:
        """JSON-able: the target and the heat averaged over a ``cells`` x ``cells`` grid, scaled to [0, 1]
        (what the API answers: coarse on purpose, no scores or raw outputs)."""
        heat = self.heatmap.heat
        h, w = heat.shape
        ys = np.linspace(0, h, cells + 1).astype(int)
        xs = np.linspace(0, w, cells + 1).astype(int)
        grid = np.array([[heat[ys[i]:max(ys[i + 1], ys[i] + 1), xs[j]:max(xs[j + 1], xs[j] + 1)].mean()
                          for j in range(cells)] for i in range(cells)])
        peak = float(grid.max())
        grid = grid / peak if peak > 0 else grid
        return {"target": self.target.to_json(), "passes": self.heatmap.passes,
                "window": self.heatmap.window, "stride": self.heatmap.stride,
                "grid": [[round(float(v), 3) for v in row] for row in grid]}


def explain(image: np.ndarray, *, prepare: Prepare, run: RunBatch, post: Postprocessor | None,
            order: list[str], window: int | None = None, max_passes: int = DEFAULT_MAX_PASSES,
            batch: int = 8, progress: Callable[[int, int], None] | None = None) -> Explanation:
    """Explain the model's answer on ``image`` (HxWx3 uint8 RGB) by occlusion sensitivity."""
    tensors, transform = prepare(image)
    target = choose_target(run([tensors])[0], post, transform, order)

    def score(frames: list[np.ndarray]) -> np.ndarray:
        outputs = run([prepare(f)[0] for f in frames])
        return np.array([target.score(o) for o in outputs])

    size = window if window is not None else max(8, max(image.shape[:2]) // 8)
    heat = occlusion(image, score, window=size, max_passes=max_passes, batch=batch, progress=progress)
    return Explanation(heat, target)
