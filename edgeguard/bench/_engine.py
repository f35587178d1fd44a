"""Engine benchmark: EdgeGuard's full path against the raw library on the same work, interleaved.

Throughput: the same input tensor through ``Engine.infer`` (input guard + fast path + output checks) and
through a bare ``InferenceSession.run`` / LiteRT ``invoke``, single calls alternated so machine noise hits
both, compared by medians; the session options of both sides are read back and must match.
Cold start: ``open_bundle`` (verify + decrypt) + ``Engine.load`` until ready (session + self-test; standbys
are built in the background afterwards) against creating a raw session from the plaintext file, interleaved
reps, medians; the self-test's own inference time is reported separately.
Figures are ratios measured side by side: absolute times on a shared machine mean little.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeguard import zoo
from edgeguard.bundle import open_bundle, pack_bundle
from edgeguard.engine._engine import Engine
from edgeguard.engine._litert import litert_module
from edgeguard.engine._onnx import OnnxBackend
from edgeguard.errors import BackendError
from edgeguard.keys import (
    TrustStore,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
)
from edgeguard.profiles import detect_profile

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
        litert_module()  # ai_edge_litert, or tflite_runtime on boards that only have that
    except BackendError as exc:
        print(f"blazeface: skipped, {exc} (edgeguard[bench])", file=out)
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
            report = quantize_onnx(zoo.fetch("yolov8n"), images, target, options=QuantizeOptions(
                input_shapes={"images": (1, 3, 320, 320)}, samples=4,
                preprocess={"size": [320, 320], "layout": "NCHW"}))
        except Exception as exc:  # report and go on with the other models
            print(f"yolov8n-int8: skipped, quantization failed: {exc}", file=out)
            return None
    if report.kept_fp32:  # no int8 model paid off on this machine: nothing to compare
        print(f"yolov8n-int8: skipped, {report.reason}", file=out)
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


def _seal(case: Case, keys: _Keys, path: Path, *, golden: bool = True) -> None:
    model = case.model_path.read_bytes()
    spec = {"name": case.input_name, "dtype": "float32", "shape": list(case.tensor.shape),
            "range": list(case.value_range)}
    meta: dict[str, Any] = {"inputs": [spec], "tolerance": {"rtol": 1e-3, "atol": 1e-3}}
    path.write_bytes(pack_bundle(model, name=case.key, version=1, sign_key=keys.publisher,
                                 recipients=[keys.recipient], model_format=case.fmt,  # type: ignore[arg-type]
                                 golden=[{"in": {case.input_name: case.tensor}}] if golden else [],
                                 meta=meta))


class _Raw:
    """The raw library side: create a session from the plaintext file, and one inference on a live one."""

    def __init__(self, case: Case, threads: int) -> None:
        self.case, self.threads = case, threads
        self.feed = {case.input_name: case.tensor}
        self.session: Any = self.create()
        if case.fmt == "onnx":
            self.run: Callable[[], object] = lambda: self.session.run(None, self.feed)
        else:
            interp = self.session
            index = interp.get_input_details()[0]["index"]
            outs = [d["index"] for d in interp.get_output_details()]

            def run_lite() -> object:
                interp.set_tensor(index, case.tensor)
                interp.invoke()
                return [interp.get_tensor(i) for i in outs]

            self.run = run_lite

    def create(self, *, from_path: bool = False) -> Any:
        """onnxruntime / LiteRT defaults plus the profile's thread count: what a user would write, from the
        file's path (the library reads it) or from its bytes."""
        path = self.case.model_path
        if self.case.fmt == "onnx":
            import onnxruntime as ort  # noqa: PLC0415

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            source: Any = str(path) if from_path else path.read_bytes()
            return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        Interpreter = litert_module()[0].Interpreter

        if from_path:
            interp = Interpreter(model_path=str(path), num_threads=self.threads)
        else:
            interp = Interpreter(model_content=path.read_bytes(), num_threads=self.threads)
        interp.allocate_tensors()
        return interp


_ORT_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode",
                "execution_order", "enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse")


def _options_diff(raw: _Raw, engine: Engine) -> list[str]:
    """Session options that differ between the raw session and the engine's active one (like for like)."""
    backend = engine._fast.active_backend
    if not isinstance(backend, OnnxBackend):
        return []  # LiteRT exposes no options to read back; both sides pass the same num_threads
    a, b = raw.session.get_session_options(), backend.session_options()
    diff = [f"{k}: raw {getattr(a, k)} vs edgeguard {getattr(b, k)}" for k in _ORT_OPTIONS
            if str(getattr(a, k)) != str(getattr(b, k))]
    used = backend.describe()["providers"]
    if raw.session.get_providers() != used:
        diff.append(f"providers: raw {raw.session.get_providers()} vs edgeguard {used}")
    return diff


def _throughput(raw: Callable[[], object], eg: Callable[[], object], *, pairs: int) -> dict[str, float]:
    """Alternate single calls (raw, EG, EG, raw, ...) so drift and bursts of load hit both sides alike;
    compare medians, which a single descheduled call cannot move."""
    raw_t: list[float] = []
    eg_t: list[float] = []
    for fn in (raw, eg, raw, eg, raw, eg):  # warm-up
        fn()
    for i in range(pairs):
        order = ((raw, raw_t), (eg, eg_t)) if i % 2 == 0 else ((eg, eg_t), (raw, raw_t))
        for fn, sink in order:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    paired = statistics.median(r / e for r, e in zip(raw_t, eg_t, strict=True))
    raw_med, eg_med = statistics.median(raw_t), statistics.median(eg_t)
    return {"raw_ms": raw_med * 1e3, "edgeguard_ms": eg_med * 1e3, "ratio": raw_med / eg_med,
            "ratio_paired": paired}


def _bench_case(
    case: Case, keys: _Keys, tmp: Path, *, quick: bool, step: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    profile = detect_profile()
    step("sealing")
    bundle = tmp / f"{case.key}.egm"
    _seal(case, keys, bundle)
    # The same model without golden vectors: how much of verify + decrypt is the golden vectors' (they exist
    # only for the self-test; PP-OCR's 640x640 float input and output are larger than the model itself).
    bare = tmp / f"{case.key}-bare.egm"
    _seal(case, keys, bare, golden=False)
    raw = _Raw(case, profile.effective_threads)

    # The profile as shipped: standby candidates are built in the background after the engine is ready, so
    # they do not count here (close() waits for that build, so it never overlaps the next measurement).
    opens: list[float] = []
    cold_raw: dict[bool, list[float]] = {False: [], True: []}  # from bytes / from path
    cold_eg: list[float] = []
    cold_self: list[float] = []

    def cold_raw_once(from_path: bool) -> None:
        t0 = time.perf_counter()
        raw.create(from_path=from_path)
        cold_raw[from_path].append(time.perf_counter() - t0)

    def cold_eg_once() -> None:
        t0 = time.perf_counter()
        opened = open_bundle(bundle, trust=keys.trust, device_key=keys.device, state_dir=None)
        t1 = time.perf_counter()
        engine = Engine.load(opened, profile=profile)
        cold_eg.append(time.perf_counter() - t0)
        opens.append(t1 - t0)
        cold_self.append(engine._fast.ready_selftest_ms / 1e3)  # the self-test inside readiness
        engine.close()

    opens_bare: list[float] = []

    def open_bare_once() -> None:
        t0 = time.perf_counter()
        open_bundle(bare, trust=keys.trust, device_key=keys.device, state_dir=None).wipe()
        opens_bare.append(time.perf_counter() - t0)

    steps: list[Callable[[], None]] = [lambda: cold_raw_once(False), lambda: cold_raw_once(True),
                                       cold_eg_once, open_bare_once]
    step("cold start")
    for once in steps:  # warm-up: first-use costs (imports, page cache, allocator) go to neither side
        once()
    for v in (opens, opens_bare, cold_raw[False], cold_raw[True], cold_eg, cold_self):
        v.clear()
    for i in range(5 if quick else 11):
        for once in steps[i % 4:] + steps[: i % 4]:  # rotate the order
            once()

    opened = open_bundle(bundle, trust=keys.trust, device_key=keys.device, state_dir=None)
    engine = Engine.load(opened, profile=profile)
    engine._fast.wait_standby()
    options_diff = _options_diff(raw, engine)
    feed = {case.input_name: case.tensor}
    heavy = case.key == "ppocr-det"
    pairs = (20 if heavy else 60) if quick else (60 if heavy else 300)
    step("throughput")
    tp = _throughput(raw.run, lambda: engine.infer(feed), pairs=pairs)
    loaded = [c.label for c in engine.candidates() if c.status in ("active", "standby")]
    engine.close()
    # The raw side is the faster of its two ways of creating a session (strictest comparison).
    raw_from_path = statistics.median(cold_raw[True]) < statistics.median(cold_raw[False])
    raw_med, eg_med, self_med, open_med = (statistics.median(v) * 1e3
                                           for v in (cold_raw[raw_from_path], cold_eg, cold_self, opens))
    # Per-rep differences keep the pairing: (EG total - its self-test) of the same rep.
    excl = statistics.median(t - st for t, st in zip(cold_eg, cold_self, strict=True)) * 1e3
    golden_med = max(0.0, open_med - statistics.median(opens_bare) * 1e3)
    engine_only = statistics.median(t - st - o for t, st, o in
                                    zip(cold_eg, cold_self, opens, strict=True)) * 1e3
    return {
        "model": case.key, "runtime": "onnxruntime" if case.fmt == "onnx" else "litert",
        "profile": profile.name, "loaded": loaded, "threads": profile.effective_threads,
        "options_diff": options_diff,
        "throughput": {k: round(v, 3) for k, v in tp.items()}, "throughput_target": TARGETS[case.key],
        "cold_start": {"raw_ms": round(raw_med, 2), "raw_from": "path" if raw_from_path else "bytes",
                       "edgeguard_ms": round(eg_med, 2),
                       "selftest_ms": round(self_med, 2),
                       "verify_decrypt_ms": round(open_med, 2),
                       # session creation + copy + wipe: what the engine adds on top of the bundle layer
                       "ratio_engine_only": round(engine_only / raw_med, 3),
                       "ratio_without_selftest": round(excl / raw_med, 3),
                       # verify + decrypt of the golden vectors counted with the self-test they serve
                       "golden_decrypt_ms": round(golden_med, 2),
                       "ratio_without_selftest_and_golden": round((excl - golden_med) / raw_med, 3),
                       "ratio_total": round(eg_med / raw_med, 3)},
        "cold_target": COLD_TARGET,
    }


@contextmanager
def _native_info_hidden() -> Iterator[TextIO]:
    """Keep LiteRT's native "INFO: Created TensorFlow Lite XNNPACK delegate" lines off the terminal.

    The C++ runtime writes them straight to file descriptor 2 for every interpreter, and neither an
    environment variable nor the Python API turns them off. So fd 2 goes to a temporary file while the
    benchmark runs, and every other line written there (warnings, errors) is replayed on stderr afterwards.
    Yields a stream on the real stderr, for the progress display.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with os.fdopen(os.dup(saved), "w") as real:
                yield real
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if not line.startswith("INFO: "):
                    print(line, file=sys.stderr)


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def run_benchmarks(
    *, quick: bool, only: Sequence[str] | None, as_json: bool, out: TextIO, strict: bool = False
) -> int:
    """Run the benchmark and print its tables (or JSON), progress on a terminal's stderr.

    Returns the exit code: 0 when all ran (and, with ``strict``, every ratio met its target), else 1.
    """
    results: list[dict[str, Any]] = []
    with _native_info_hidden() as err, tempfile.TemporaryDirectory(prefix="edgeguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys = _Keys(tmp / "keys")
        cases = _cases(only, out)
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=Console(file=err), transient=True, disable=not err.isatty())
        with progress:
            task = progress.add_task("bench", total=len(cases))
            for n, case in enumerate(cases, 1):

                def step(phase: str, case: Case = case, n: int = n) -> None:
                    progress.update(task, description=f"[{n}/{len(cases)}] {case.key}: {phase}")

                results.append(_bench_case(case, keys, tmp, quick=quick, step=step))
                progress.advance(task)
    for r in results:
        r["throughput_ok"] = r["throughput"]["ratio"] >= r["throughput_target"]
        r["cold_ok"] = r["cold_start"]["ratio_without_selftest"] <= r["cold_target"]
    missed = [r["model"] for r in results if not (r["throughput_ok"] and r["cold_ok"])]
    code = 1 if strict and missed else 0
    if as_json:
        print(json.dumps({"results": results, "missed": missed}), file=out)
        return code
    console = Console(file=out, width=100)
    # Two narrow tables rather than one wide one: each fits 100 columns, each ratio next to its target.
    table = Table("model", "runtime", "raw ms", "EdgeGuard ms", "ratio (paired)", "target", "",
                  title="Throughput: raw / EdgeGuard per inference (higher is better)")
    for r in results:
        tp = r["throughput"]
        table.add_row(r["model"], r["runtime"], f"{tp['raw_ms']:.2f}", f"{tp['edgeguard_ms']:.2f}",
                      f"{tp['ratio']:.3f} ({tp['ratio_paired']:.3f})", f">= {r['throughput_target']}",
                      _mark(r["throughput_ok"]))
    console.print(table)
    table = Table("model", "raw ms", "EG ms", "verify+ decrypt ms", "self-test ms", "ratio excl. self-test",
                  "target", "", "engine only",
                  title="Cold start: EdgeGuard / raw session creation (lower is better)")
    for r in results:
        cs = r["cold_start"]
        table.add_row(r["model"], f"{cs['raw_ms']:.1f}", f"{cs['edgeguard_ms']:.1f}",
                      f"{cs['verify_decrypt_ms']:.1f}", f"{cs['selftest_ms']:.1f}",
                      f"{cs['ratio_without_selftest']:.3f}", f"<= {COLD_TARGET}", _mark(r["cold_ok"]),
                      f"{cs['ratio_engine_only']:.3f}")
    console.print(table)
    for r in results:
        cs = r["cold_start"]
        same = "same session options" if not r["options_diff"] else \
            f"SESSION OPTIONS DIFFER: {'; '.join(r['options_diff'])}"
        console.print(f"{r['model']}: profile {r['profile']}, {r['threads']} threads, loaded: "
                      f"{', '.join(r['loaded'])}; {same}; raw cold start from the file's {cs['raw_from']} "
                      f"(the faster way); golden vectors' share of verify+decrypt "
                      f"{cs['golden_decrypt_ms']:.1f} ms, cold x without self-test and golden vectors "
                      f"{cs['ratio_without_selftest_and_golden']:.3f}")
    if missed:
        console.print(f"[red]✗ below target: {', '.join(missed)}[/]" + ("" if strict else
                      " (figures from a shared machine vary; --strict makes this exit 1)"))
    return code
