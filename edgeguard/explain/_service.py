"""The service's explanations (``POST /v1/explain``): an image through the serving engine, bounded in cost.

The photo is decoded under the model's own image limits and scaled down to at most ``MAX_SIDE`` pixels on its
longer side before any occluded copy is made (a batch holds ``batch`` copies of it), and the number of
forward passes is capped by ``sources.api.explain_max_passes``. The answer is the summary only: the target
(kind, class, label, box) and a coarse 16x16 heat grid scaled to [0, 1] — no scores, no raw outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from edgeguard.engine.preprocess import decode_image

from ._explain import explain
from ._runners import ServingEngine, engine_runner

__all__ = ["explain_image_bytes", "MAX_SIDE"]

MAX_SIDE = 640
_BATCH = 4


def explain_image_bytes(engine: ServingEngine, body: bytes, *, max_passes: int) -> dict[str, Any]:
    """Explain the engine's answer on PNG/JPEG ``body`` (``InputRejected`` for a bad image)."""
    runner = engine_runner(engine)
    limits = runner.pre.limits
    image = decode_image(body, limits=limits, max_decoded_bytes=limits.decoded_budget(MAX_SIDE, MAX_SIDE))
    h, w = image.shape[:2]
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    result = explain(image, prepare=runner.prepare, run=runner.run, post=runner.post, order=runner.order,
                     max_passes=max_passes, batch=_BATCH)
    summary = result.summary()
    if max(h, w) > MAX_SIDE and "box" in summary["target"]:
        back = max(h, w) / MAX_SIDE  # the box in the pixels of the photo that was sent
        summary["target"]["box"] = [round(v * back, 1) for v in summary["target"]["box"]]
    summary["image"] = {"width": w, "height": h}
    return summary
