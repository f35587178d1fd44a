"""Measure how well fingerprints separate derived copies from unrelated models on the zoo, and what an
explanation costs against one inference. Prints a table; nothing is written outside a temporary directory.

    .venv/bin/python tools/fingerprint_separation.py [--count 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeguard import zoo  # noqa: E402
from edgeguard.engine.preprocess import ImageLimits, decode_image  # noqa: E402
from edgeguard.explain import backend_runner, draft_manifest, explain  # noqa: E402
from edgeguard.fingerprint import compare, load_model, make_trigger  # noqa: E402
from edgeguard.quantize import QuantizeOptions, quantize_onnx  # noqa: E402
from tests.fingerprint._derive import derived_copy  # noqa: E402

SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "yolov8n": {"images": (1, 3, 320, 320)},
    "ppocr-det": {"x": (1, 3, 320, 320)},
    "ppocr-cls": {"x": (1, 3, 48, 192)},
    "magika": {},
    "blazeface": {},
}
RANGES = {"blazeface": (-1.0, 1.0), "magika": (0.0, 255.0)}


def _int8(key: str, tmp: Path) -> Path | None:
    photos = tmp / "photos"
    photos.mkdir(exist_ok=True)
    for item in ("astronaut.png", "coffee.png", "chelsea.png", "text.png"):
        (photos / item).write_bytes(zoo.fetch(item).read_bytes())
    out = tmp / f"{key}-int8.onnx"
    report = quantize_onnx(zoo.fetch(key), photos, out, options=QuantizeOptions(
        bench_runs=3, min_speedup=0.01, input_shapes=SHAPES[key]))
    return None if report.kept_fp32 else out


def separation(owner: str, count: int, tmp: Path) -> list[dict[str, object]]:
    src = zoo.fetch(owner)
    with load_model(src, shapes=SHAPES[owner]) as model:
        ranges = {s.name: RANGES[owner] for s in model.inputs} if owner in RANGES else None
        started = time.perf_counter()
        trigger = make_trigger(model, count=count, ranges=ranges)
        make_s = time.perf_counter() - started
    suspects: dict[str, tuple[str, Path | None]] = {"same file": ("derived", src)}
    if src.suffix == ".onnx":
        for noise in (0.01, 0.05):
            suspects[f"weights x(1 +- {noise:.0%})"] = ("derived", derived_copy(src, tmp / f"n{noise}.onnx",
                                                                                 noise=noise))
        if owner == "yolov8n":
            suspects["int8 (edgeguard quantize)"] = ("derived", _int8(owner, tmp))
        for seed in (1, 2):
            suspects[f"weights permuted #{seed}"] = ("unrelated", derived_copy(
                src, tmp / f"p{seed}.onnx", permute=True, seed=seed))
    for other in ("yolov8n", "ppocr-det", "ppocr-cls", "magika", "blazeface"):
        if other != owner:
            suspects[f"zoo {other}"] = ("unrelated", zoo.fetch(other))
    rows: list[dict[str, object]] = []
    for name, (kind, path) in suspects.items():
        if path is None:
            rows.append({"owner": owner, "suspect": name, "kind": kind, "rate": None, "note": "not produced"})
            continue
        shapes = SHAPES.get(name.removeprefix("zoo "), SHAPES[owner]) if name.startswith("zoo ") \
            else SHAPES[owner]
        with load_model(path, shapes=shapes) as suspect:
            result = compare(suspect, trigger)
        rows.append({"owner": owner, "suspect": name, "kind": kind, "rate": round(result.rate, 3),
                     "match": result.ok, "median_corr": result.to_json()["median_correlation"],
                     "note": result.reason[:60], "make_s": round(make_s, 1)})
    return rows


def explain_cost(batch: int) -> dict[str, float]:
    meta = json.loads((ROOT / "examples" / "yolov8n-meta.json").read_text())
    image = decode_image(zoo.fetch("astronaut.png").read_bytes(), limits=ImageLimits())
    with load_model(zoo.fetch("yolov8n"), shapes=SHAPES["yolov8n"]) as model:
        runner = backend_runner(model.backend, draft_manifest(meta, "onnx"))
        tensors, _ = runner.prepare(image)
        runner.run([tensors])  # warm-up
        singles = []
        for _ in range(10):
            started = time.perf_counter()
            runner.run([runner.prepare(image)[0]])
            singles.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = explain(image, prepare=runner.prepare, run=runner.run, post=runner.post, order=runner.order,
                         batch=batch)
        total = time.perf_counter() - started
    one = float(np.median(singles))
    return {"batch": batch, "passes": result.heatmap.passes, "one_inference_ms": round(one * 1000, 1),
            "explain_s": round(total, 2), "ratio": round(total / one, 1),
            "ratio_per_pass": round(total / one / result.heatmap.passes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--owners", default="yolov8n,magika,blazeface,ppocr-cls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        for owner in args.owners.split(","):
            count = 64 if owner == "ppocr-cls" else args.count
            for row in separation(owner, count, Path(tmp_name)):
                print(json.dumps(row), flush=True)
    for batch in (1, 8):
        print(json.dumps(explain_cost(batch)), flush=True)


if __name__ == "__main__":
    main()
