#!/usr/bin/env python3
"""`edgeguard quantize` on YOLOv8n (NudeNet 320n) vs the fp32 original, on real photographs.

    python tools/bench_quantize.py [--runs 50] [--threads 0] [--int8 MODEL.onnx] [--json]

Quantizes the zoo's YOLOv8n with the accuracy guard (calibrating on the zoo photographs), then runs the raw
fp32 model and the quantized one side by side in plain onnxruntime sessions with identical options,
interleaved run by run, on each photograph. Prints per image: latencies, speed ratio, top classes of both and
the IoU of the top boxes. Targets: >= 1.6x faster, same top classes, top-box IoU >= 0.9. Exit 0 when all are
met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from edgeguard import zoo
from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.engine.postprocess import box_iou, decode_yolov8
from edgeguard.engine.preprocess import Preprocessor, parse_preprocess
from edgeguard.quantize import QuantizeOptions, quantize_onnx
from edgeguard.quantize._quantizer import cpu_session

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "text.png")
SPEED_TARGET, IOU_TARGET = 1.6, 0.9


def _preprocessor() -> Preprocessor:
    manifest = Manifest(
        format="onnx", name="yolov8n", version=1, created="", payload_sha256="", payload_size=0,
        chunk_size=1, publisher_key_id="", recipient_key_ids=(),
        inputs=(TensorSpec("images", "float32", (1, 3, 320, 320)),), preprocess={"resize": "letterbox"},
    )
    spec = parse_preprocess(manifest)
    assert spec is not None
    return Preprocessor(spec)


def _median_ms(fp32: Any, int8: Any, feed: dict[str, np.ndarray], runs: int) -> tuple[float, float]:
    for session in (fp32, int8):
        for _ in range(3):
            session.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(runs):
        for index, session in enumerate((fp32, int8)):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times[0])), float(np.median(times[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and image")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--int8", type=Path, default=None, help="quantized model to use (skip quantizing)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    fp32_path = zoo.fetch("yolov8n")
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        chosen = "given"
        if args.int8 is None:
            photos = tmp / "photos"
            photos.mkdir()
            for key in PHOTOS:
                (photos / key).write_bytes(zoo.fetch(key).read_bytes())
            console.print("quantizing YOLOv8n with the accuracy guard ...")
            start = time.perf_counter()
            report = quantize_onnx(fp32_path, photos, tmp / "int8.onnx",
                                   options=QuantizeOptions(input_shapes={"images": (1, 3, 320, 320)}))
            console.print(f"quantized in {time.perf_counter() - start:.1f} s: {report.reason}")
            if report.kept_fp32:  # no int8 model to compare: the quantizer kept fp32 and said why
                return 1
            chosen = report.chosen or "none"
            int8_path = tmp / "int8.onnx"
        else:
            int8_path = args.int8
        fp32, int8 = cpu_session(fp32_path, args.threads), cpu_session(int8_path, args.threads)
        pre = _preprocessor()
        rows: list[dict[str, Any]] = []
        for key in PHOTOS:
            feed = pre(zoo.fetch(key).read_bytes()).tensors
            ref = decode_yolov8(fp32.run(None, feed)[0][0], conf=0.25, iou=0.45, max_detections=100)
            got = decode_yolov8(int8.run(None, feed)[0][0], conf=0.25, iou=0.45, max_detections=100)
            fp32_ms, int8_ms = _median_ms(fp32, int8, feed, args.runs)
            both = ref[0].shape[0] and got[0].shape[0]
            iou = float(box_iou(ref[0][:1], got[0][:1])[0, 0]) if both else None
            rows.append({
                "image": key, "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3),
                "speedup": round(fp32_ms / int8_ms, 3),
                "fp32_top": ref[2][:3].tolist(), "int8_top": got[2][:3].tolist(),
                "same_top_classes": set(ref[2][:3].tolist()) == set(got[2][:3].tolist()),
                "top_box_iou": None if iou is None else round(iou, 4),
            })
    speedup = float(np.median([r["speedup"] for r in rows]))
    ious = [r["top_box_iou"] for r in rows if r["top_box_iou"] is not None]
    same = all(r["same_top_classes"] for r in rows)
    # An image where fp32 finds something and int8 nothing counts as IoU 0 through same_top_classes.
    ok = speedup >= SPEED_TARGET and same and all(v >= IOU_TARGET for v in ious)
    summary = {"model": "yolov8n (nudenet 320n)", "candidate": chosen, "median_speedup": round(speedup, 3),
               "same_top_classes": same, "min_top_box_iou": min(ious) if ious else None,
               "targets": {"speedup": SPEED_TARGET, "top_box_iou": IOU_TARGET}, "met": ok, "images": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        title = f"YOLOv8n int8 ({chosen}) vs fp32, onnxruntime {ort.__version__}, same session options"
        table = Table(title=title)
        for column in ("image", "fp32 ms", "int8 ms", "speed-up", "fp32 top classes", "int8 top classes",
                       "top-box IoU"):
            table.add_column(column)
        for r in rows:
            iou_text = "-" if r["top_box_iou"] is None else f"{r['top_box_iou']:.3f}"
            table.add_row(r["image"], f"{r['fp32_ms']:.2f}", f"{r['int8_ms']:.2f}", f"{r['speedup']:.2f}x",
                          str(r["fp32_top"]), str(r["int8_top"]), iou_text)
        out = Console()
        out.print(table)
        out.print(f"median speed-up {speedup:.2f}x (target >= {SPEED_TARGET}x); same top classes: {same}; "
                  f"min top-box IoU {summary['min_top_box_iou']} (target >= {IOU_TARGET}): "
                  + ("[green]targets met[/]" if ok else "[red]targets NOT met[/]"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
