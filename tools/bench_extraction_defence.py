"""Benchmark: what the model-extraction defences cost per request — the per-token query budget (token bucket +
window budget, with its persisted state) and output hardening (top-k, rounding, Laplace noise) — against the
same work without them, side by side.

    python tools/bench_extraction_defence.py [--requests 200] [--rounds 5] [--skip-service]

1. In process, real models (PP-OCR's orientation classifier without a postprocess: top-k is derived from its
   output; YOLOv8n on a photo with its yolov8 postprocess): ``engine.infer`` + ``result.to_json()`` vs
   ``budgets.take()`` + ``engine.infer`` + ``result_json(result, policy)``, interleaved in rounds, medians;
   and each defence alone in microseconds (``take`` with the state written every 100 queries, with fsync;
   ``result_json`` vs ``to_json``).
2. On the real service: two ``edgeguard run`` side by side serving the same classifier, one without budgets
   and with an undeclared bundle, one with ``[sources.api.budget]`` (limits far above what the run uses) and a
   hardened bundle; ``--requests`` sequential ``.npy`` round trips per round to each, alternating, medians.
   No broker: results stay in each outbox (the same for both).
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard import zoo
from edgeguard.bundle import open_bundle, pack_bundle
from edgeguard.bundle.manifest import NoiseSpec, OutputPolicy
from edgeguard.engine import Engine
from edgeguard.engine.harden import result_json
from edgeguard.keys import (
    TrustStore,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
)
from edgeguard.sources._budget import BudgetConfig, BudgetLimits, QueryBudgets

TOKEN = "bench-token-0123456789abcdef"
CLS_OUT = "save_infer_model/scale_0.tmp_1"
CLS_META: dict[str, Any] = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 48, 192], "range": [-1.0, 1.0]}],
    "outputs": [{"name": CLS_OUT, "dtype": "float32", "shape": [1, 2]}],
}
YOLO_META: dict[str, Any] = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 320, 320], "range": [0.0, 1.0]}],
    "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 22, 2100]}],
    "preprocess": {"size": [320, 320], "layout": "NCHW", "resize": "letterbox"},
    "postprocess": {"kind": "yolov8", "conf": 0.25, "iou": 0.45},
}
HARDENING = {"top_k": 1, "round_decimals": 2, "raw_logits": False,
             "noise": {"kind": "laplace", "scale": 0.01}}
POLICY = OutputPolicy(top_k=1, round_decimals=2, raw_logits=False,
                      noise=NoiseSpec(kind="laplace", scale=0.01))
BUDGET = BudgetConfig(default=BudgetLimits(rate_per_s=1e6, burst=10_000_000, window_queries=1_000_000_000),
                      persist_every_queries=100)


def _seal(root: Path, model: bytes, meta: dict[str, Any], golden: dict[str, np.ndarray], name: str) -> Path:
    keys = root / "keys"
    if not (keys / "publisher.key").exists():
        generate_keypair("publisher", keys)
        generate_keypair("device", keys)
    path = root / f"{name}.egm"
    path.write_bytes(pack_bundle(
        model, name=name.split("-", maxsplit=1)[0], version=1,
        sign_key=load_publisher_key(keys / "publisher.key"),
        recipients=[load_recipient_key(keys / "device.pub")], model_format="onnx",
        golden=[{"in": golden, "out": {}}], meta=meta,
    ))
    return path


def _engine(root: Path, bundle: Path) -> Engine:
    trust = TrustStore([load_trusted_key(root / "keys/publisher.pub")])
    device_key = load_device_key(root / "keys/device.key")
    opened = open_bundle(bundle, trust=trust, device_key=device_key, state_dir=None)
    return Engine.load(opened)


def _median_us(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def in_process(root: Path, reps: int, rounds: int) -> None:
    cls = zoo.fetch("ppocr-cls").read_bytes()
    yolo = zoo.fetch("yolov8n").read_bytes()
    photo = zoo.fetch("astronaut.png").read_bytes()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    y = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    cases = [
        ("ppocr-cls (derived top-k)", _engine(root, _seal(root, cls, CLS_META, {"x": x}, "cls-plain")),
         lambda e: e.infer({"x": x})),
        ("yolov8n + postprocess", _engine(root, _seal(root, yolo, YOLO_META, {"images": y}, "yolo-plain")),
         lambda e: e.infer_image(photo)),
    ]
    print("1. in process, per request (median of rounds of medians)")
    print(f"   {'model':28} {'plain':>10} {'defended':>10} {'ratio':>7} {'A/A':>7}   take() median/mean"
          "   result_json  to_json")
    for label, engine, run in cases:
        _measure(root, label, engine, run, reps=reps, rounds=rounds)
        engine.close()


def _measure(root: Path, label: str, engine: Engine, run: Callable[[Engine], Any], *, reps: int,
             rounds: int) -> None:
    budgets = QueryBudgets(BUDGET, state_path=root / f"budget-{label[:4]}.json")
    result = run(engine)

    def plain() -> object:
        return run(engine).to_json()

    def defended() -> object:
        budgets.take("app")
        return result_json(run(engine), POLICY)

    # Three variants interleaved call by call in a rotating order; the second plain one is the A/A control:
    # how far two identical variants differ here is the noise floor of the ratio.
    variants = (plain, defended, plain)
    rounds_r: tuple[list[float], list[float], list[float]] = ([], [], [])
    for _ in range(rounds):
        times: tuple[list[float], list[float], list[float]] = ([], [], [])
        for i in range(reps):
            for which in (i % 3, (i + 1) % 3, (i + 2) % 3):
                t0 = time.perf_counter()
                variants[which]()
                times[which].append(time.perf_counter() - t0)
        for which in range(3):
            rounds_r[which].append(statistics.median(times[which]) * 1e6)
    plain_r, defended_r, control_r = rounds_r
    take = _median_us(lambda: budgets.take("app"), reps * 20)
    t0 = time.perf_counter()
    for _ in range(reps * 20):  # the mean includes the state write (fsync) every 100 queries
        budgets.take("app")
    take_mean = (time.perf_counter() - t0) / (reps * 20) * 1e6
    hard = _median_us(lambda: result_json(result, POLICY), reps * 20)
    plain_json = _median_us(result.to_json, reps * 20)
    p, d = statistics.median(plain_r), statistics.median(defended_r)
    aa = statistics.median(control_r) / p
    print(f"   {label:28} {p:8.0f}us {d:8.0f}us {d / p:7.3f} {aa:7.3f}   {take:5.1f}us/{take_mean:6.1f}us"
          f"   {hard:8.1f}us  {plain_json:6.1f}us")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service(root: Path, bundle: Path, *, defended: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    (root / "tokens").write_text(f"app infer,status {TOKEN}\n")
    (root / "tokens").chmod(0o600)
    budget = ("\n[sources.api.budget]\nrate_per_s = 1000000.0\nburst = 10000000\n"
              "window_queries = 1000000000\n" if defended else "")
    cfg = root / "edgeguard.toml"
    cfg.write_text(f"""
[device]
id = "bench"
state_dir = "state"
[model]
bundle = "{bundle}"
trust = ["keys/publisher.pub"]
device_key = "keys/device.key"
[sources.api]
host = "127.0.0.1"
port = {port}
tokens_file = "tokens"
infer_threads = 1
{budget}
[link]
port = {_free_port()}
""")
    cfg.chmod(0o600)
    log = open(root / "service.log", "ab")  # noqa: SIM115 - for the service's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "edgeguard", "run", "-c", str(cfg)],
                            stdout=log, stderr=log)
    return proc, port


def _wait_up(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"service exited {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("service not up")


def on_service(root: Path, reps: int, rounds: int) -> None:
    cls = zoo.fetch("ppocr-cls").read_bytes()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    procs = []
    ports = {}
    try:
        for label, defended in (("plain", False), ("defended", True)):
            d = root / label
            d.mkdir()
            (d / "keys").symlink_to(root / "keys")
            meta = dict(CLS_META, output=HARDENING) if defended else CLS_META
            bundle = _seal(d, cls, meta, {"x": x}, f"cls-{label}")
            proc, port = _service(d, bundle, defended=defended)
            procs.append(proc)
            ports[label] = port
        for proc, port in zip(procs, ports.values(), strict=True):
            _wait_up(port, proc)
        conns = {k: http.client.HTTPConnection("127.0.0.1", p, timeout=60) for k, p in ports.items()}
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-npy"}

        def one(label: str) -> float:
            t0 = time.perf_counter()
            conns[label].request("POST", "/v1/infer", body=body, headers=headers)
            resp = conns[label].getresponse()
            data = resp.read()
            if resp.status != 200:
                raise SystemExit(f"{label}: {resp.status} {data[:200]!r}")
            return time.perf_counter() - t0

        medians: dict[str, list[float]] = {"plain": [], "defended": []}
        for _ in range(rounds):
            times: dict[str, list[float]] = {"plain": [], "defended": []}
            for i in range(reps):  # alternating request by request: both see the same load
                order = ("plain", "defended") if i % 2 == 0 else ("defended", "plain")
                for label in order:
                    times[label].append(one(label))
            for label, values in medians.items():
                values.append(statistics.median(times[label]) * 1e3)
        plain_ms, defended_ms = statistics.median(medians["plain"]), statistics.median(medians["defended"])
        print("2. real service, API round trip (.npy body, durable outbox write), median of round medians")
        pairs = zip(medians["plain"], medians["defended"], strict=True)
        ratio = defended_ms / plain_ms
        print(f"   plain {plain_ms:.2f} ms   defended {defended_ms:.2f} ms   ratio {ratio:.3f}"
              "   (rounds, plain/defended: "
              f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in pairs)})")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-service", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="eg-bench-extraction-"))
    in_process(root, args.requests, args.rounds)
    if not args.skip_service:
        on_service(root, args.requests, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
