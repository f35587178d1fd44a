"""Benchmark: signed remote command round trip, from signing to a verified answer.

    python tools/bench_commands.py [--commands 100] [--command ping]

Starts its own mosquitto (``/usr/sbin/mosquitto`` or ``--mosquitto``) on a free local port and one real
device service (``edgeguard run``: supervisor + worker, a tiny sealed model, ``[commands]`` enabled), then
sends ``--commands`` commands one after another with ``edgeguard.fleet.commands`` and times each from the
start of signing to the answer whose signature verified with the device's pinned key (sign, publish QoS 1,
broker, device gatekeeper with its durable nonce write, action, signed answer, broker, verify). Prints median
and p99 (nearest rank), and the raw MQTT round trip (publish -> a subscriber echoes it back) for comparison.
``--nodelay`` sets mosquitto's ``set_tcp_nodelay true``: by default mosquitto leaves Nagle's algorithm on,
which with delayed ACKs adds ~40 ms per hop to small request/answer exchanges on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.bundle import pack_bundle
from edgeguard.fleet.commands import CommandSender, parse_target, sign_command
from edgeguard.keys import (
    generate_keypair,
    load_publisher_key,
    load_recipient_key,
    load_signing_key,
    load_verify_key,
)
from edgeguard.link import LinkConfig

FLEET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_onnx() -> bytes:
    from onnx import TensorProto, helper  # a dev dependency, only here

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "tiny", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def provision(root: Path, broker_port: int) -> Path:
    for kind in ("publisher", "device", "operator"):
        generate_keypair(kind, root / "keys")
    bundle = pack_bundle(
        tiny_onnx(),
        name="sensor",
        version=1,
        sign_key=load_publisher_key(root / "keys/publisher.key"),
        recipients=[load_recipient_key(root / "keys/device.pub")],
        model_format="onnx",
        golden=[{"in": {"x": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)}, "out": {}}],
        meta={
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4], "range": [0.0, 1.0]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
        },
    )
    (root / "model.egm").write_bytes(bundle)
    config = root / "edgeguard.toml"
    config.write_text(f"""
[device]
id = "dev-1"
fleet = "{FLEET}"
state_dir = "state"

[model]
bundle = "model.egm"
trust = ["keys/publisher.pub"]
device_key = "keys/device.key"

[link]
host = "127.0.0.1"
port = {broker_port}
heartbeat_s = 5.0

[commands]
enabled = true
operator_keys = ["keys/operator.pub"]
""")
    config.chmod(0o600)
    return config


def raw_echo_rtt(port: int, n: int) -> list[float]:
    """publish -> a second client echoes it -> back: the broker's own share of a round trip."""
    got = threading.Event()
    a = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    b = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def echo(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        c.publish("echo/out", m.payload, qos=1)

    b.on_message = echo
    a.on_message = lambda _c, _u, _m: got.set()
    for c in (a, b):
        c.connect("127.0.0.1", port)
        sock = c.socket()
        if isinstance(sock, socket.socket):  # as the device link and the operator tool do
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.loop_start()
    b.subscribe("echo/in", qos=1)
    a.subscribe("echo/out", qos=1)
    time.sleep(0.5)  # both SUBACKs (a benchmark warm-up, not a test)
    out = []
    for _ in range(n):
        got.clear()
        t = time.perf_counter()
        a.publish("echo/in", b"x" * 600, qos=1)
        if not got.wait(5):
            raise SystemExit("raw echo lost a message")
        out.append(time.perf_counter() - t)
    for c in (a, b):
        c.disconnect()
        c.loop_stop()
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=100)
    ap.add_argument("--command", default="ping", choices=("ping", "status"))
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    ap.add_argument("--nodelay", action="store_true", help="mosquitto set_tcp_nodelay true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="eg-bench-cmd-") as tmp:
        root = Path(tmp)
        port = free_port()
        conf = root / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true"]
        lines += ["user root"] if os.geteuid() == 0 else []
        lines += ["set_tcp_nodelay true"] if args.nodelay else []
        conf.write_text("\n".join(lines) + "\n")
        broker = subprocess.Popen([args.mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)
        service = None
        try:
            config = provision(root, port)
            service = subprocess.Popen(
                [sys.executable, "-m", "edgeguard", "run", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=open(root / "service.log", "wb"),  # noqa: SIM115 - closed with the process
            )
            pub = root / "state/device-sign.pub"
            deadline = time.monotonic() + 60
            sender = None
            while time.monotonic() < deadline:
                if pub.exists():
                    sender = CommandSender(
                        broker=LinkConfig(host="127.0.0.1", port=port),
                        fleet=FLEET,
                        pinned={"dev-1": load_verify_key(pub, "device-sign")},
                    )
                    sender.connect()
                    if "dev-1" in sender.statuses:
                        break
                    sender.close()
                    sender = None
                time.sleep(0.2)
            if sender is None:
                raise SystemExit("device did not come online: " + (root / "service.log").read_text()[-2000:])
            key = load_signing_key(root / "keys/operator.key")
            times = []
            for _ in range(args.commands):
                t = time.perf_counter()
                cmd = sign_command(key, fleet=FLEET, target=parse_target("dev-1", FLEET), name=args.command,
                                   args={}, now=int(time.time()))
                report = sender.send(cmd, timeout=10)
                d = report.deliveries["dev-1"]
                if d.answer is None or not d.answer.ok or d.answer.verdict != "verified":
                    raise SystemExit(f"no verified ok answer: {d}")
                times.append(time.perf_counter() - t)
            sender.close()
            raw = raw_echo_rtt(port, args.commands)
        finally:
            if service is not None:
                service.terminate()
                service.wait(30)
            broker.terminate()
            broker.wait(10)
    ms = [t * 1000 for t in times]
    raw_ms = [t * 1000 for t in raw]
    how = "set_tcp_nodelay true" if args.nodelay else "default"
    print(f"mosquitto {how}; command round trip ({args.command}, {len(ms)} commands, sign -> verified): "
          f"median {statistics.median(ms):.1f} ms, p99 {p99(ms):.1f} ms, max {max(ms):.1f} ms")
    print(f"raw MQTT echo round trip (QoS 1, same broker): median {statistics.median(raw_ms):.1f} ms, "
          f"p99 {p99(raw_ms):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
