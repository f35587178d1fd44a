"""The heatmap as a PNG: the photo dimmed, the heat on top in a black-red-yellow ramp, the target's box."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["overlay_png"]


def _ramp(heat: np.ndarray) -> np.ndarray:
    """0 -> transparent black, 0.5 -> red, 1 -> yellow (HxWx3 uint8)."""
    r = np.clip(heat * 2.0, 0.0, 1.0)
    g = np.clip(heat * 2.0 - 1.0, 0.0, 1.0)
    return (np.stack([r, g, np.zeros_like(heat)], axis=2) * 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heat: np.ndarray,
                box: tuple[float, float, float, float] | None = None) -> bytes:
    peak = float(heat.max())
    norm = heat / peak if peak > 0 else heat
    alpha = (0.25 + 0.6 * norm)[..., None]
    blended = image.astype(np.float64) * (1.0 - alpha) + _ramp(norm).astype(np.float64) * alpha
    picture = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")
    if box is not None:
        ImageDraw.Draw(picture).rectangle(box, outline=(0, 255, 255), width=2)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
