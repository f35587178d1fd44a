"""Engine benchmark: EdgeGuard's full path against the raw library on the same work, interleaved.

Throughput: the same input tensor through ``Engine.infer`` (input guard + fast path + output checks) and
through a bare ``InferenceSession.run`` / LiteRT ``invoke``, in alternating blocks so machine noise hits both.
Cold start: ``open_bundle`` (verify + decrypt) + ``Engine.load`` (session + self-test) against creating a raw
session from the plaintext file; the self-test's own inference time is reported separately.
Figures are ratios measured side by side: absolute times on a shared machine mean little.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeguard import zoo
from edgeguard.bundle import open_bundle, pack_bundle
from edgeguard.keys import (
    TrustStore,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
)
from edgeguard.profiles import detect_profile

from ._engine import Engine

__all__ = ["run_benchmarks", "Case"]

TARGETS = {"yolov8n": 0.95, "yolov8n-int8": 0.95, "ppocr-det": 0.95, "blazeface": 0.85}
COLD_TARGET = 1.15


@dataclass(frozen=True)
class Case:
    key: str
    zoo_key: str
    fmt: str
    input_name: str
    tensor: np.ndarray
    value_range: tuple[float, float]
    model_path: Path


def _image(key: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - the bench extra only

    with Image.open(zoo.fetch(key)) as im:
        rgb = im.convert("RGB").resize((size[1], size[0]))
    return np.asarray(rgb, dtype=np.float32)


def _cases(only: Sequence[str] | None, out: TextIO) -> list[Case]:
    wanted = list(only or TARGETS)
    cases: list[Case] = []
    yolo_x = (_image("astronaut.png", (320, 320)) / 255.0).transpose(2, 0, 1)[None].copy()
    if "yolov8n" in wanted:
        cases.append(Case("yolov8n", "yolov8n", "onnx", "images", yolo_x, (0.0, 1.0), zoo.fetch("yolov8n")))
    if "yolov8n-int8" in wanted:
        int8 = _yolo_int8(out)
        if int8 is not None:
            cases.append(Case("yolov8n-int8", "yolov8n", "onnx", "images", yolo_x, (0.0, 1.0), int8))
    if "ppocr-det" in wanted:
        x = ((_image("text.png", (640, 640)) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()
        cases.append(Case("ppocr-det", "ppocr-det", "onnx", "x", x, (-1.0, 1.0), zoo.fetch("ppocr-det")))
    if "blazeface" in wanted and not _has_litert(out):
        wanted.remove("blazeface")
    if "blazeface" in wanted:
        x = (_image("astronaut.png", (128, 128)) / 127.5 - 1.0)[None].copy()
        path = zoo.fetch("blazeface")
        cases.append(Case("blazeface", "blazeface", "tflite", "input", x, (-1.0, 1.0), path))
    return cases


def _has_litert(out: TextIO) -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401, PLC0415 - optional extra
    except ImportError:
        print("blazeface: skipped, ai-edge-litert is not installed (edgeguard[bench])", file=out)
        return False
    return True


def _yolo_int8(out: TextIO) -> Path | None:
    """YOLOv8n quantized by ``edgeguard.quantize`` (cached next to the zoo files)."""
    target = zoo.cache_dir() / "bench" / "yolov8n-int8.onnx"
    if target.exists():
        return target
    try:
        from edgeguard.quantize import QuantizeOptions, quantize_onnx  # noqa: PLC0415 - needs onnx
    except ImportError as exc:
        print(f"yolov8n-int8: skipped, quantizer unavailable ({exc})", file=out)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp)
        for key in ("astronaut.png", "coffee.png", "chelsea.png", "text.png"):
            (images / key).write_bytes(zoo.fetch(key).read_bytes())
        print("yolov8n-int8: quantizing with edgeguard.quantize (once; cached) ...", file=out)
        try:
            quantize_onnx(zoo.fetch("yolov8n"), images, target, options=QuantizeOptions(
                input_shapes={"images": (1, 3, 320, 320)}, samples=4,
                preprocess={"size": [320, 320], "layout": "NCHW"}))
        except Exception as exc:  # report and go on with the other models
            print(f"yolov8n-int8: skipped, quantization failed: {exc}", file=out)
            return None
    return target


class _Keys:
    def __init__(self, directory: Path) -> None:
        _, pub, _ = generate_keypair("publisher", directory)
        _, dev_pub, _ = generate_keypair("device", directory)
        self.publisher = load_publisher_key(directory / "publisher.key")
        self.recipient = load_recipient_key(dev_pub)
        self.device = load_device_key(directory / "device.key")
        self.trust = TrustStore.from_files([pub])


def _seal(case: Case, keys: _Keys, path: Path) -> None:
    model = case.model_path.read_bytes()
    spec = {"name": case.input_name, "dtype": "float32", "shape": list(case.tensor.shape),
            "range": list(case.value_range)}
    meta: dict[str, Any] = {"inputs": [spec], "tolerance": {"rtol": 1e-3, "atol": 1e-3}}
    path.write_bytes(pack_bundle(model, name=case.key, version=1, sign_key=keys.publisher,
                                 recipients=[keys.recipient], model_format=case.fmt,  # type: ignore[arg-type]
                                 golden=[{"in": {case.input_name: case.tensor}}], meta=meta))


def _raw_runner(case: Case, threads: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(create a raw session from the plaintext file, one raw inference on an already created session)."""
    feed = {case.input_name: case.tensor}
    if case.fmt == "onnx":
        import onnxruntime as ort  # noqa: PLC0415

        def create() -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            return ort.InferenceSession(case.model_path.read_bytes(), sess_options=opts,
                                        providers=["CPUExecutionProvider"])

        sess = create()
        return create, lambda: sess.run(None, feed)
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - optional extra

    def create_lite() -> Any:
        interp = Interpreter(model_content=case.model_path.read_bytes(), num_threads=threads)
        interp.allocate_tensors()
        return interp

    interp = create_lite()
    index = interp.get_input_details()[0]["index"]
    outs = [d["index"] for d in interp.get_output_details()]

    def run() -> object:
        interp.set_tensor(index, case.tensor)
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return create_lite, run


def _throughput(raw: Callable[[], object], eg: Callable[[], object], *, rounds: int, per_round: int) -> dict[
        str, float]:
    raw_t: list[float] = []
    eg_t: list[float] = []
    for fn in (raw, eg):  # warm-up
        for _ in range(3):
            fn()
    for r in range(rounds):
        order = [(raw, raw_t), (eg, eg_t)] if r % 2 == 0 else [(eg, eg_t), (raw, raw_t)]
        for fn, sink in order:
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - t0)
    return {"raw_ms": statistics.median(raw_t) * 1e3, "edgeguard_ms": statistics.median(eg_t) * 1e3,
            "ratio": sum(raw_t) / sum(eg_t)}


def _bench_case(case: Case, keys: _Keys, tmp: Path, *, quick: bool) -> dict[str, Any]:
    profile = detect_profile()
    bundle = tmp / f"{case.key}.egm"
    _seal(case, keys, bundle)
    create_raw, run_raw = _raw_runner(case, profile.effective_threads)

    # Like for like: the raw side creates one session, so the cold start loads no standby either (the
    # standby's extra session and self-test are what ``loaded`` below shows for the throughput engine).
    single = replace(profile, engine=replace(profile.engine, standby=0))
    opens: list[float] = []

    def cold_edgeguard() -> tuple[float, float, Engine]:
        t0 = time.perf_counter()
        opened = open_bundle(bundle, trust=keys.trust, device_key=keys.device, state_dir=None)
        opens.append(time.perf_counter() - t0)
        engine = Engine.load(opened, profile=single)
        return time.perf_counter() - t0, engine.health()["selftest_ms"] / 1e3, engine

    cold_raw: list[float] = []
    cold_eg: list[float] = []
    cold_self: list[float] = []
    for i in range(3 if quick else 7):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                t0 = time.perf_counter()
                create_raw()
                cold_raw.append(time.perf_counter() - t0)
            else:
                total, selftest, engine = cold_edgeguard()
                engine.close()
                cold_eg.append(total)
                cold_self.append(selftest)
    opened = open_bundle(bundle, trust=keys.trust, device_key=keys.device, state_dir=None)
    engine = Engine.load(opened, profile=profile)
    feed = {case.input_name: case.tensor}
    heavy = case.key == "ppocr-det"
    rounds, per_round = (4, 3 if heavy else 10) if quick else (10, 5 if heavy else 30)
    tp = _throughput(run_raw, lambda: engine.infer(feed), rounds=rounds, per_round=per_round)
    loaded = [c.label for c in engine.candidates() if c.status in ("active", "standby")]
    engine.close()
    raw_med, eg_med, self_med, open_med = (statistics.median(v) * 1e3
                                           for v in (cold_raw, cold_eg, cold_self, opens))
    return {
        "model": case.key, "runtime": "onnxruntime" if case.fmt == "onnx" else "litert",
        "profile": profile.name, "loaded": loaded, "threads": profile.effective_threads,
        "throughput": {k: round(v, 3) for k, v in tp.items()}, "throughput_target": TARGETS[case.key],
        "cold_start": {"raw_ms": round(raw_med, 1), "edgeguard_ms": round(eg_med, 1),
                       "selftest_ms": round(self_med, 1),
                       "verify_decrypt_ms": round(open_med, 1),
                       # session creation + wipe only: what the engine adds on top of the bundle layer
                       "ratio_engine_only": round((eg_med - self_med - open_med) / raw_med, 3),
                       "ratio_without_selftest": round((eg_med - self_med) / raw_med, 3),
                       "ratio_total": round(eg_med / raw_med, 3)},
        "cold_target": COLD_TARGET,
    }


def run_benchmarks(*, quick: bool, only: Sequence[str] | None, as_json: bool, out: TextIO) -> int:
    """Run the benchmark and print its table (or JSON); returns the exit code (0: all ran)."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys = _Keys(tmp / "keys")
        for case in _cases(only, out):
            results.append(_bench_case(case, keys, tmp, quick=quick))
    if as_json:
        print(json.dumps({"results": results}), file=out)
        return 0
    console = Console(file=out, width=200)
    table = Table("model", "runtime", "raw ms", "EdgeGuard ms", "throughput x", "target", "cold raw ms",
                  "cold EG ms", "verify+decrypt ms", "self-test ms", "cold x (excl. self-test)",
                  "cold x engine only",
                  title="EdgeGuard vs raw library")
    for r in results:
        tp, cs = r["throughput"], r["cold_start"]
        table.add_row(r["model"], r["runtime"], f"{tp['raw_ms']:.2f}", f"{tp['edgeguard_ms']:.2f}",
                      f"{tp['ratio']:.3f}", f">= {r['throughput_target']}", f"{cs['raw_ms']:.1f}",
                      f"{cs['edgeguard_ms']:.1f}", f"{cs['verify_decrypt_ms']:.1f}",
                      f"{cs['selftest_ms']:.1f}",
                      f"{cs['ratio_without_selftest']:.3f} (<= {COLD_TARGET})",
                      f"{cs['ratio_engine_only']:.3f}")
    console.print(table)
    for r in results:
        console.print(f"{r['model']}: profile {r['profile']}, {r['threads']} threads, loaded: "
                      f"{', '.join(r['loaded'])}")
    return 0
