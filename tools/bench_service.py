"""Benchmark: the service's local API round trip vs calling the engine directly, and MTTR for faults.

    python tools/bench_service.py [--model PATH.onnx] [--requests 40] [--skip-mttr]

1. Overhead. One sealed YOLOv8n bundle (or ``--model``, e.g. an int8 QDQ export) is served by a real
   ``edgeguard run`` (supervisor + worker, a real mosquitto when one is installed) and loaded in this process
   with ``Engine.load`` from the same bundle. For each request kind (PNG images of three sizes and a raw .npy
   tensor) it times ``--requests`` sequential round trips over HTTP (keep-alive, bearer token, durable outbox
   write with fsync before the answer) and the same number of direct ``engine.infer_image``/``engine.infer``
   calls, interleaved in rounds, and reports median latencies and their ratio (service / direct).
2. MTTR. With ``fault_injection`` on, it injects a hang (the worker's event loop blocks) and a crash (the
   worker exits) and times from the injection until a replacement worker answers ``/v1/health``; the target is
   the hang timeout + 2 s. The supervisor's own MTTR figure (from its state file) is printed too.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgeguard import zoo
from edgeguard.bundle import open_bundle, pack_bundle
from edgeguard.engine import Engine
from edgeguard.keys import (
    TrustStore,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
)

TOKEN = "bench-token-0123456789abcdef"
HANG_TIMEOUT_S = 3.0
META: dict[str, Any] = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 320, 320], "range": [0.0, 1.0]}],
    "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 22, 2100]}],
    "preprocess": {"size": [320, 320], "layout": "NCHW", "resize": "letterbox"},
    "postprocess": {"kind": "yolov8", "conf": 0.25, "iou": 0.45},
    "tolerance": {"rtol": 1e-2, "atol": 1e-2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provision(root: Path, model: bytes) -> Path:
    keys = root / "keys"
    generate_keypair("publisher", keys)
    generate_keypair("device", keys)
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    bundle = pack_bundle(
        model,
        name="bench",
        version=1,
        sign_key=load_publisher_key(keys / "publisher.key"),
        recipients=[load_recipient_key(keys / "device.pub")],
        model_format="onnx",
        golden=[{"in": {"images": x}, "out": {}}],
        meta=META,
    )
    (root / "model.egm").write_bytes(bundle)
    tokens = root / "tokens"
    tokens.write_text(f"bench infer,status,admin {TOKEN}\n")
    tokens.chmod(0o600)
    return root / "model.egm"


def write_config(root: Path, api_port: int, broker_port: int, *, fsync: bool) -> Path:
    cfg = root / "edgeguard.toml"
    cfg.write_text(f"""
[device]
id = "bench"
state_dir = "state"
[model]
bundle = "model.egm"
trust = ["keys/publisher.pub"]
device_key = "keys/device.key"
[service]
liveness_s = 0.25
hang_timeout_s = {HANG_TIMEOUT_S}
backoff_initial_s = 0.1
backoff_max_s = 1.0
crash_loop_restarts = 50
fault_injection = true
[sources.api]
host = "127.0.0.1"
port = {api_port}
tokens_file = "tokens"
infer_threads = 1
max_body_bytes = 8388608
[outbox]
synchronous_full = {"true" if fsync else "false"}
[link]
port = {broker_port}
heartbeat_s = 5.0
""")
    return cfg


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype}
        for attempt in (1, 2):  # a kept-alive connection to a worker that was replaced fails once
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt == 2:
                    raise
        data = resp.read()
        return resp.status, json.loads(data) if data else None


def health_pid(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        return int(doc["pid"])
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None


def wait_pid(port: int, *, other_than: int | None, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = health_pid(port)
        if pid is not None and pid != other_than:
            return pid, time.monotonic() - t0
        time.sleep(0.02)
    raise SystemExit(f"no worker answered within {timeout} s")


def png_of(size: tuple[int, int], source: Path) -> bytes:
    img = Image.open(source).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def npy_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="ONNX model with YOLOv8n's I/O (default: the zoo's fp32)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-mttr", action="store_true")
    ap.add_argument(
        "--no-fsync",
        action="store_true",
        help="outbox synchronous_full = false (kill -9 safe, not power-cut safe): shows the fsync cost",
    )
    args = ap.parse_args()
    model = (args.model or zoo.fetch("yolov8n")).read_bytes()
    astronaut = zoo.fetch("astronaut.png")
    root = Path(tempfile.mkdtemp(prefix="eg-bench-service-"))
    broker: subprocess.Popen[bytes] | None = None
    service: subprocess.Popen[bytes] | None = None
    try:
        bundle_path = provision(root, model)
        broker_port = free_port()
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
        )
        if mosquitto:
            (root / "mosquitto.conf").write_text(
                f"user root\nlistener {broker_port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n"
            )
            broker = subprocess.Popen(
                [mosquitto, "-c", str(root / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        api_port = free_port()
        cfg = write_config(root, api_port, broker_port, fsync=not args.no_fsync)
        log = open(root / "service.log", "ab")  # noqa: SIM115 - for the service's lifetime
        service = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "run", "-c", str(cfg)], stdout=log, stderr=log
        )
        first_pid, _ = wait_pid(api_port, other_than=None, timeout=180)
        keys = root / "keys"
        engine = Engine.load(
            open_bundle(
                bundle_path,
                trust=TrustStore([load_trusted_key(keys / "publisher.pub")]),
                device_key=load_device_key(keys / "device.key"),
                state_dir=None,
            )
        )
        client = Client(api_port)
        kinds: list[tuple[str, bytes, str, Any]] = [
            ("png 320x320", png_of((320, 320), astronaut), "image/png", None),
            ("png 640x480", png_of((640, 480), astronaut), "image/png", None),
            ("png 1280x960", png_of((1280, 960), astronaut), "image/png", None),
        ]
        tensor = np.random.default_rng(1).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
        kinds.append(("npy 1x3x320x320 f32", npy_of(tensor), "application/x-npy", tensor))
        print(
            f"model: {len(model) / 1e6:.1f} MB, {args.requests} requests per kind, {args.rounds} rounds, "
            f"engine on {engine.health()['accelerator']} ({engine.health()['backend']}), "
            f"outbox fsync {'off' if args.no_fsync else 'on'}"
        )
        print(f"{'request':22} {'bytes':>9} {'direct ms':>10} {'service ms':>11} {'ratio':>6}")
        for name, body, ctype, array in kinds:
            direct: list[float] = []
            served: list[float] = []
            for _ in range(args.rounds):
                for _ in range(max(1, args.requests // args.rounds)):
                    t0 = time.perf_counter()
                    if array is None:
                        engine.infer_image(body)
                    else:
                        engine.infer({"images": array})
                    direct.append(time.perf_counter() - t0)
                for _ in range(max(1, args.requests // args.rounds)):
                    t0 = time.perf_counter()
                    status, _doc = client.call("POST", "/v1/infer", body, ctype)
                    served.append(time.perf_counter() - t0)
                    if status != 200:
                        raise SystemExit(f"service answered {status}: {_doc}")
            d, s = statistics.median(direct) * 1e3, statistics.median(served) * 1e3
            print(f"{name:22} {len(body):9d} {d:10.2f} {s:11.2f} {s / d:6.2f}x")
        engine.close()
        if not args.skip_mttr:
            print(f"\nMTTR (hang timeout {HANG_TIMEOUT_S:g} s; target <= {HANG_TIMEOUT_S + 2:g} s)")
            pid = first_pid
            for kind in ("hang", "crash"):
                t0 = time.monotonic()
                status, _doc = client.call(
                    "POST", "/v1/admin/fault", json.dumps({"kind": kind}).encode(), "application/json"
                )
                pid, _ = wait_pid(api_port, other_than=pid, timeout=60)
                took = time.monotonic() - t0
                verdict = "ok" if took <= HANG_TIMEOUT_S + 2 else "OVER TARGET"
                print(f"  {kind:6} injected -> replacement serving in {took:5.2f} s  {verdict}")
            state = json.loads((root / "state" / "supervisor.json").read_text())
            print(
                f"  supervisor: {state['failures']} failures, MTTR {state['mttr_s']} s (from the worker "
                f"becoming useless to its replacement ready), reasons: "
                f"{[h['reason'] for h in state['history']]}"
            )
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                service.kill()
        if broker is not None:
            broker.kill()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
