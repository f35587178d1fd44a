#!/usr/bin/env python3
"""The adversarial-input detector's cost: the engine with ``defence.adversarial`` off vs on, side by side.

    python tools/bench_adversarial.py [--pairs 200] [--only digits] [--json]

For each model the same engine path (guard, fast path, post-processing) runs with the detector off and on
(flag mode, threshold calibrated on clean inputs), calls alternated (off, on, on, off, ...) so that load on
this shared machine hits both alike; the ratio is of the medians (and the median of paired ratios). Goal
(issue 12): on <= 2x off. Models: the digits MLP (`edgeguard robustness`; one squeezer, bits 3, and the set
`robustness --search` chose, bits 4 and 5 with a normalised score: two squeezed versions) and PP-OCR's
text-line orientation classifier (a real conv net from the rapidocr_onnxruntime wheel, 1x3x48x192): bits and
a 2x2 median as two squeezed versions (the paper's way), as one joint version, and bits alone. Whether the
versions run as one batch is what the calibration measured faster on this CPU (column `batched`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from edgeguard import zoo
from edgeguard.bundle.manifest import GoldenSample, Manifest, TensorSpec
from edgeguard.engine import Engine
from edgeguard.robustness import load_digits, mlp_onnx, train_digits_mlp
from edgeguard.robustness._calibrate import adversarial_defence


@dataclass
class _Source:
    manifest: Manifest
    model: bytearray
    golden: Sequence[GoldenSample] = field(default_factory=tuple)

    def wipe(self) -> None:
        self.model[:] = bytes(len(self.model))


def _manifest(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], defence: Any) -> Manifest:
    return Manifest(format="onnx", name="bench", version=1, created="2026-01-01T00:00:00Z",
                    payload_sha256="0" * 64, payload_size=1, chunk_size=65536, publisher_key_id="bench",
                    recipient_key_ids=("bench",), inputs=tuple(inputs), outputs=tuple(outputs),
                    defence=defence)


def _crops(n: int) -> np.ndarray:
    """Text-line crops of skimage's text.png (a real image), as PP-OCR's classifier takes them."""
    img = np.asarray(Image.open(zoo.fetch("text.png")).convert("RGB"), dtype=np.float32)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, img.shape[0] - 40)), int(rng.integers(0, img.shape[1] - 160))
        crop = Image.fromarray(img[y:y + 40, x:x + 160].astype(np.uint8)).resize((192, 48))
        out.append(((np.asarray(crop, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _cases() -> list[tuple[str, bytes, list[TensorSpec], list[TensorSpec], np.ndarray, dict[str, Any]]]:
    digits = load_digits()
    train, cal, _ = digits.split(0.6, 0.2, 0.2)
    d_in = [TensorSpec("x", "float32", (None, 1, 8, 8), (0.0, 1.0))]
    d_out = [TensorSpec("probs", "float32", (None, 10))]
    cls_in = [TensorSpec("x", "float32", (None, 3, 48, 192), (-1.0, 1.0))]
    cls_out = [TensorSpec("save_infer_model/scale_0.tmp_1", "float32", (None, 2))]
    cls_model = zoo.fetch("ppocr-cls").read_bytes()
    digits_model = mlp_onnx(train_digits_mlp(train))
    return [
        ("digits-mlp (bits 3)", digits_model, d_in, d_out, cal.x, {"bits": 3, "median": 0}),
        ("digits-mlp (bits 4 + 5, normalised)", digits_model, d_in, d_out, cal.x,
         {"squeezers": [("bits", 4), ("bits", 5)]}),
        ("ppocr-cls (bits 4 + median 2)", cls_model, cls_in, cls_out, _crops(40), {"bits": 4, "median": 2}),
        ("ppocr-cls (bits 4, median 2 joint)", cls_model, cls_in, cls_out, _crops(40),
         {"bits": 4, "median": 2, "joint": True}),
        ("ppocr-cls (bits 4 only)", cls_model, cls_in, cls_out, _crops(40), {"bits": 4, "median": 0}),
    ]


def _alternate(off: Callable[[], object], on: Callable[[], object], pairs: int) -> dict[str, float]:
    off_t: list[float] = []
    on_t: list[float] = []
    for fn in (off, on, off, on, off, on):  # warm-up
        fn()
    for i in range(pairs):
        order = ((off, off_t), (on, on_t)) if i % 2 == 0 else ((on, on_t), (off, off_t))
        for fn, sink in order:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    q_off, q_on = statistics.quantiles(off_t, n=4), statistics.quantiles(on_t, n=4)
    return {"off_ms": statistics.median(off_t) * 1e3, "on_ms": statistics.median(on_t) * 1e3,
            "ratio": statistics.median(on_t) / statistics.median(off_t),
            "ratio_paired": statistics.median(b / a for a, b in zip(off_t, on_t, strict=True)),
            # The lower quartile: what a call costs when no other process takes the CPU away (shared box).
            "off_p25_ms": q_off[0] * 1e3, "on_p25_ms": q_on[0] * 1e3, "ratio_p25": q_on[0] / q_off[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="alternated off/on call pairs per model")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", metavar="TEXT", help="only the models whose name contains TEXT (e.g. digits)")
    args = ap.parse_args(argv)
    rows = []
    for name, model, inputs, outputs, clean, squeeze in _cases():
        if args.only and args.only not in name:
            continue
        meta = {"inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs]}
        samples = [{"x": clean[i:i + 1]} for i in range(len(clean))]
        defence = adversarial_defence(model, "onnx", meta=meta, samples=samples, mode="flag", fpr=0.05,
                                      **squeeze)
        x = {"x": clean[:1]}
        on = Engine.load(_Source(_manifest(inputs, outputs, defence), bytearray(model)))
        # The same fast path (the same session) without the declaration: only the detector differs. (Two
        # sessions alternating would slow each other down: onnxruntime's threads spin after a run.)
        off = Engine(manifest=_manifest(inputs, outputs, None), fastpath=on._fast, profile=on.profile)
        try:
            tp = _alternate(functools.partial(off.infer, x), functools.partial(on.infer, x), args.pairs)
        finally:
            on.close()
        rows.append({"model": name, "batched": defence["adversarial"]["batched"], **tp})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'model':34} {'batched':>7} {'off ms':>8} {'on ms':>8} {'on/off':>7} {'paired':>7} {'p25':>6}"
    print(f"{head}  goal <= 2x (median)")
    for r in rows:
        mark = "ok" if r["ratio"] <= 2.0 else "MISS"
        print(f"{r['model']:34} {r['batched']!s:>7} {r['off_ms']:8.3f} {r['on_ms']:8.3f} {r['ratio']:7.2f} "
              f"{r['ratio_paired']:7.2f} {r['ratio_p25']:6.2f}  {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
