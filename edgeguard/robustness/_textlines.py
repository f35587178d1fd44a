"""A small real data set for PP-OCR's text-line orientation classifier (zoo ``ppocr-cls``): crops of the
printed lines of skimage's ``page.png`` (zoo), upright (label 0) and turned 180 degrees (label 1), resized
and normalised as PP-OCR does (height 48, width up to 192 keeping the aspect, ``(x / 255 - 0.5) / 0.5``,
zero padding on the right). Lines are found by their ink against a local-maximum background (the page is
unevenly lit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["text_lines"]


def _bands(grey: Image.Image) -> list[tuple[int, int]]:
    g = np.asarray(grey, np.float32)
    background = np.asarray(grey.filter(ImageFilter.MaxFilter(15)), np.float32)
    ink = ((g / np.maximum(background, 1.0)) < 0.65).mean(axis=1) > 0.02
    bands, start = [], None
    for row, on in enumerate([*ink.tolist(), False]):
        if on and start is None:
            start = row
        elif not on and start is not None:
            if row - start >= 6:
                bands.append((start, row))
            start = None
    return bands


def text_lines(per_line: int = 8, *, seed: int = 0, path: Path | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """``x`` float32 ``[N, 3, 48, 192]`` in ``[-1, 1]`` and ``y`` (0 upright, 1 upside down)."""
    if path is None:
        from edgeguard import zoo  # noqa: PLC0415 - pip download on first use only

        path = zoo.fetch("page.png")
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for top, bottom in _bands(rgb.convert("L")):
        for _ in range(per_line):
            width = int(rng.integers(80, 200))
            left = int(rng.integers(0, rgb.width - width))
            crop = rgb.crop((left, max(top - 2, 0), left + width, min(bottom + 2, rgb.height)))
            for label in (0, 1):
                turned = crop.rotate(180) if label else crop
                w = min(192, round(turned.width * 48 / turned.height))
                arr = np.zeros((48, 192, 3), np.float32)
                arr[:, :w] = (np.asarray(turned.resize((w, 48)), np.float32) / 255.0 - 0.5) / 0.5
                xs.append(arr.transpose(2, 0, 1))
                ys.append(label)
    return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)
