"""The robustness report as a PNG (Pillow only): accuracy under attack and detection rate against eps."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageDraw

from edgeguard._atomic import atomic_write

from ._evaluate import RobustnessReport

__all__ = ["plot_report"]

_W, _H, _M = 720, 420, 60  # image size and margin, pixels
_COLOURS = {("fgsm", "acc"): (31, 119, 180), ("pgd", "acc"): (214, 39, 40),
            ("fgsm", "det"): (120, 170, 220), ("pgd", "det"): (240, 140, 140)}


def plot_report(report: RobustnessReport, path: Path) -> None:
    """Write ``path``: x = eps, y = rate 0..1; solid lines accuracy, dashed detection; grey = clean accuracy
    and the calibrated false-positive rate."""
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    eps = sorted({0.0, *(r.eps for r in report.rows)})
    top = max(eps) or 1.0
    x0, x1, y0, y1 = _M, _W - 180, _H - _M, 30

    def px(e: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * e / top, y0 - (y0 - y1) * v

    draw.rectangle((x0, y1, x1, y0), outline="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = px(0, v)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 35, y - 6), f"{v:.2f}", fill="black")
    for e in eps:
        x, _ = px(e, 0)
        draw.line((x, y0, x, y0 + 5), fill="black")
        draw.text((x - 12, y0 + 8), f"{e:g}", fill="black")
    draw.text(((x0 + x1) / 2 - 60, y0 + 28), "epsilon (L-inf)", fill="black")
    draw.text((x0, 8), f"{report.model}: robustness and feature-squeezing detection", fill="black")
    for level, label in ((report.clean_accuracy, "clean accuracy"), (report.clean_fpr, "clean FPR")):
        _, y = px(0, level)
        _dashed(draw, (x0, y, x1, y), (150, 150, 150))
        draw.text((x1 + 8, y - 6), f"{label} {level:.2f}", fill=(110, 110, 110))
    legend_y = 150
    for attack in sorted({r.attack for r in report.rows}):
        rows = sorted((r for r in report.rows if r.attack == attack), key=lambda r: r.eps)
        acc = [px(0.0, report.clean_accuracy)] + [px(r.eps, r.accuracy) for r in rows]
        det = [px(r.eps, r.detection_rate) for r in rows if r.detection_rate is not None]
        for kind, points in (("acc", acc), ("det", det)):
            colour = _COLOURS.get((attack, kind), (0, 0, 0))
            if len(points) > 1:
                if kind == "acc":
                    draw.line(points, fill=colour, width=3)
                else:
                    for a, b in itertools.pairwise(points):
                        _dashed(draw, (*a, *b), colour, width=3)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            name = "accuracy" if kind == "acc" else "detected"
            draw.line((x1 + 8, legend_y + 6, x1 + 28, legend_y + 6), fill=colour, width=3)
            draw.text((x1 + 34, legend_y), f"{attack} {name}", fill="black")
            legend_y += 18
    data = _png(img)
    atomic_write(path, data, mode=0o644)


def _dashed(draw: ImageDraw.ImageDraw, line: tuple[float, float, float, float], colour: tuple[int, int, int],
            width: int = 1) -> None:
    xa, ya, xb, yb = line
    length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-9)
    dash = 6.0
    t = 0.0
    while t < length:
        u = min(t + dash, length)
        draw.line((xa + (xb - xa) * t / length, ya + (yb - ya) * t / length,
                   xa + (xb - xa) * u / length, ya + (yb - ya) * u / length), fill=colour, width=width)
        t += 2 * dash


def _png(img: Image.Image) -> bytes:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
