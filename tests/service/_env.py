"""A provisioned device for service tests: keys, sealed bundles, tokens, config, and the running service."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.bundle import pack_bundle
from edgeguard.keys import generate_keypair, load_publisher_key, load_recipient_key
from tests.support.broker import MosquittoBroker, free_port

INFER = "app-token-0123456789abcdef"
STATUS = "mon-token-0123456789abcdef"
ADMIN = "ops-token-0123456789abcdef"


HOOK_DELAY_S = 0.3


def hook_events(log: Path) -> list[str]:
    """The events the test hook has logged so far (one JSON document per line; none while it is missing)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["event"] for line in text.splitlines() if line.strip()]


def tiny_onnx(scale: float = 2.0) -> bytes:
    """y = x * scale for x float32 [1, 4] in [0, 1]: a sensor model small enough for serial frames."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "tiny", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def ensure_keys(root: Path) -> None:
    for kind in ("publisher", "device"):
        if not (root / f"keys/{kind}.key").exists():
            generate_keypair(kind, root / "keys")


def seal(
    root: Path,
    model: bytes,
    *,
    name: str,
    version: int,
    meta: dict[str, Any],
    golden_in: dict[str, np.ndarray],
    golden_out: dict[str, np.ndarray] | None = None,
    not_after: datetime | None = None,
) -> bytes:
    ensure_keys(root)
    return pack_bundle(
        model,
        name=name,
        version=version,
        sign_key=load_publisher_key(root / "keys/publisher.key"),
        recipients=[load_recipient_key(root / "keys/device.pub")],
        model_format="onnx",
        golden=[{"in": golden_in, "out": golden_out or {}}],
        meta=meta,
        not_after=not_after,
    )


TINY_META: dict[str, Any] = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4], "range": [0.0, 1.0]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
}
YOLO_META: dict[str, Any] = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 320, 320], "range": [0.0, 1.0]}],
    "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 22, 2100]}],
    "preprocess": {"size": [320, 320], "layout": "NCHW", "resize": "letterbox"},
    "postprocess": {"kind": "yolov8", "conf": 0.25, "iou": 0.45},
    "tolerance": {"rtol": 1e-3, "atol": 1e-3},
}


def tiny_bundle(
    root: Path,
    version: int = 1,
    scale: float = 2.0,
    *,
    name: str = "sensor",
    not_after: datetime | None = None,
    golden_out: dict[str, np.ndarray] | None = None,
) -> bytes:
    """``golden_out``: expected outputs to seal instead of the reference run's (a wrong one makes the
    device's self-test fail)."""
    return seal(
        root,
        tiny_onnx(scale),
        name=name,
        version=version,
        meta=TINY_META,
        golden_in={"x": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)},
        golden_out=golden_out,
        not_after=not_after,
    )


def yolo_bundle(root: Path, model_path: Path, version: int = 1) -> bytes:
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    return seal(
        root,
        model_path.read_bytes(),
        name="yolov8n",
        version=version,
        meta=YOLO_META,
        golden_in={"images": x},
    )


@dataclass
class Device:
    root: Path
    broker: MosquittoBroker
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "edgeguard.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def provision(
        self,
        bundle: bytes,
        *,
        extra: str = "",
        serial_port: str | None = None,
        directory: bool = False,
        fault_injection: bool = True,
        api_extra: str = "",
        link_extra: str = "",
        model_extra: str = "",
        service_extra: str = "",
    ) -> None:
        """``api_extra`` / ``link_extra`` / ``model_extra`` / ``service_extra``: more key lines for the
        ``[sources.api]`` / ``[link]`` / ``[model]`` / ``[service]`` tables (a TOML table cannot be
        reopened by ``extra``)."""
        ensure_keys(self.root)
        if bundle:
            (self.root / "model.egm").write_bytes(bundle)
        tokens = self.root / "tokens"
        tokens.write_text(f"app infer {INFER}\nmon status {STATUS}\nops admin,status,infer {ADMIN}\n")
        tokens.chmod(0o600)
        text = f"""
[device]
id = "dev-1"
fleet = "test"
state_dir = "state"

[model]
bundle = "model.egm"
trust = ["keys/publisher.pub"]
device_key = "keys/device.key"
profile = "generic-x86_64"
{model_extra}
[service]
liveness_s = 0.2
hang_timeout_s = 2.0
start_timeout_s = 60.0
backoff_initial_s = 0.2
backoff_max_s = 1.0
crash_loop_restarts = 3
crash_loop_window_s = 120.0
stop_timeout_s = 10.0
hooks_dir = "hooks"
fault_injection = {"true" if fault_injection else "false"}
{service_extra}

[sources.api]
unix_socket = "api.sock"
host = "127.0.0.1"
port = {self.port}
tokens_file = "tokens"
max_body_bytes = 4194304
{api_extra}
[sources.mqtt]
enabled = true
max_body_bytes = 1048576

[link]
host = "127.0.0.1"
port = {self.broker.port}
heartbeat_s = 0.5
inbound_max_bytes = 1048576
backoff_initial_s = 0.1
backoff_max_s = 0.5
{link_extra}"""
        if serial_port:
            text += (
                f'\n[sources.serial]\nenabled = true\nport = "{serial_port}"\n'
                "reopen_min_s = 0.05\nreopen_max_s = 0.3\n"
            )
        if directory:
            text += '\n[sources.directory]\nenabled = true\npath = "incoming"\npoll_s = 0.1\nsettle_s = 0.2\n'
        self.config.write_text(text + extra)
        self.config.chmod(0o600)  # it may hold link.password: a config others can read is refused then
        hooks = self.root / "hooks"
        hooks.mkdir(exist_ok=True)
        hook = hooks / "50-log"
        # Hooks run asynchronously; a deliberately late writer (as on a slow board) makes a test that reads
        # the log without waiting for it fail every time instead of once in a while.
        hook.write_text(f"#!/bin/sh\nsleep {HOOK_DELAY_S}\n(cat; echo) >> {self.root / 'hooks.log'}\n")
        hook.chmod(0o755)

    def start(self, env: dict[str, str] | None = None, **popen: Any) -> None:
        """``popen``: more ``subprocess.Popen`` arguments for the service (``cwd``, ``preexec_fn``)."""
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.root / "notify.sock"
        path.unlink(missing_ok=True)
        self.notify.bind(str(path))
        self.notify.setblocking(False)
        full = {
            **os.environ,
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "2000000",
            "EDGEGUARD_LOG": "INFO",
            **(env or {}),
        }
        full.pop("WATCHDOG_PID", None)
        self.log = open(self.root / "service.log", "ab")  # noqa: SIM115 - open for the service's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "run", "-c", str(self.config)],
            env=full,
            stdout=self.log,
            stderr=self.log,
            **popen,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        # Like systemd, read notifications continuously, so the datagram queue never fills up.
        while self.notify is not None and self.proc is not None and self.proc.poll() is None:
            self.notifications()
            time.sleep(0.05)

    def notifications(self) -> list[str]:
        sock = self.notify
        if sock is None or sock.fileno() < 0:
            return self.notes
        while True:
            try:
                self.notes.append(sock.recv(4096).decode())
            except (BlockingIOError, OSError):
                return self.notes

    def wait(self, cond: Any, timeout: float = 60.0, what: str = "") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.log_tail()}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        self.wait(lambda: any("READY=1" in n for n in self.notifications()), timeout, "READY=1")

    def log_tail(self) -> str:
        try:
            return (self.root / "service.log").read_text()[-3000:]
        except OSError:
            return ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = INFER,
        ctype: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": ctype}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data) if data else None

    def api_up(self) -> bool:
        try:
            return self.request("GET", "/v1/health", token=STATUS, timeout=2)[0] in (200, 503)
        except OSError:
            return False

    def worker_pid(self) -> int | None:
        """The serving worker's pid, or None while no worker answers (restarting, hung, killed)."""
        try:
            code, doc = self.request("GET", "/v1/health", token=STATUS, timeout=2)
        except (OSError, http.client.HTTPException, ValueError):
            return None
        return int(doc["pid"]) if code in (200, 503) else None

    def restarted(self, old: int | None) -> bool:
        pid = self.worker_pid()
        return pid is not None and pid != old

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.notify is not None:
            self.notifications()  # the last ones (STOPPING=1)
            sock, self.notify = self.notify, None
            sock.close()
        self.log.close()
        return self.proc.returncode
