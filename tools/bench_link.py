"""Benchmark: draining an outbox backlog over MQTT QoS 1 vs raw paho publishing the same messages.

    python tools/bench_link.py [--results 20000] [--reps 3] [--ready-backlog 1000000]

Starts its own mosquitto (``/usr/sbin/mosquitto`` or ``--mosquitto``) on a free local port.

1. Drain. EdgeGuard: an outbox holding ``--results`` results (filled beforehand, not timed); ``MqttLink`` is
   started and we time from its connection until the outbox is empty, that is: every result read from SQLite,
   decrypted, published at QoS 1 within the in-flight window, acknowledged by the broker (PUBACK) and deleted.
   Raw: one paho client (``loop_start``, default in-flight window 20, MQTT 5) publishes the same envelopes at
   QoS 1 from memory and we time until the last PUBACK. Same messages (same envelope bytes and sizes), same
   QoS, same in-flight window (20), MQTT 5 both, same broker; interleaved repetitions, medians, ratio of
   rates. Also reported: the client process's CPU time per message (user + system, all threads: for
   EdgeGuard that includes SQLite and decryption), which a shared, noisy machine disturbs less than the
   wall-clock rate.
2. Ready with a large backlog: an outbox holding ``--ready-backlog`` results is closed; then we time opening
   it and starting the link until a new ``put()`` returned and the first queued result was acknowledged by
   the broker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox, OutboxConfig

KEY = bytes(range(32))


class Broker:
    def __init__(self, binary: str, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        conf = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        lines += ["log_dest stderr", "log_type error", "max_queued_messages 0"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would otherwise drop to the `mosquitto` user
        conf.write_text("\n".join(lines) + "\n")
        self.log = directory / "mosquitto.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"mosquitto did not start: {self.log.read_text(errors='replace')[-500:]}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def body(i: int, size: int) -> bytes:
    b = f'{{"i":{i},"label":"person","score":0.87,"box":[12,40,200,310],"pad":"'.encode()
    return b + b"x" * max(0, size - len(b) - 2) + b'"}'


def envelope(i: int, payload: bytes) -> bytes:
    # The same bytes the link publishes (id, seq, class, time, then the result).
    head = f'{{"id":"bench:{i}","seq":{i},"kind":"result","priority":false,"created":1795600000.123,"data":'
    return head.encode() + payload + b"}"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def bench_raw(port: int, messages: list[bytes]) -> tuple[float, float]:
    done = threading.Event()
    acked = 0

    def on_publish(_c: object, _u: object, _mid: int, _rc: object, _p: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    while not c.is_connected():
        time.sleep(0.005)
    t0, c0 = time.perf_counter(), _cpu()
    for m in messages:
        c.publish("edgeguard/v1/bench/raw/results", m, qos=1)
    if not done.wait(120):
        raise SystemExit("raw paho did not finish")
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    c.disconnect()
    c.loop_stop()
    return len(messages) / elapsed, cpu / len(messages)


def fill(path: Path, payloads: list[bytes], cfg: OutboxConfig) -> None:
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=cfg)
    for start in range(0, len(payloads), 5000):
        ob.put_many(payloads[start : start + 5000])
    ob.close()


def bench_link(port: int, directory: Path, payloads: list[bytes]) -> tuple[float, float]:
    path = directory / "drain.db"
    for p in directory.glob("drain.db*"):
        p.unlink()
    fill(path, payloads, OutboxConfig())
    ob = Outbox(path=path, storage_key=KEY, device_id="bench")
    link = MqttLink(config=LinkConfig(port=port, heartbeat_s=60), fleet="bench", device_id="eg", outbox=ob)
    link.start()
    if not link.wait_connected(10):
        raise SystemExit(f"link did not connect: {link.state.error}")
    t0, c0 = time.perf_counter(), _cpu()
    while link.state.acked < len(payloads):  # cheap to poll; then wait for the deletes to be committed
        time.sleep(0.002)
    while ob.stats().depth:
        time.sleep(0.002)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    link.stop()
    ob.close()
    return len(payloads) / elapsed, cpu / len(payloads)


def bench_ready(port: int, directory: Path, backlog: int, size: int) -> dict[str, float]:
    path = directory / "ready.db"
    cfg = OutboxConfig(max_count=backlog + 1000, max_bytes=1 << 36)
    t0 = time.perf_counter()
    p = body(0, size)
    fill(path, [p] * backlog, cfg)
    filled = time.perf_counter() - t0
    t0 = time.perf_counter()
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=cfg)
    link = MqttLink(config=LinkConfig(port=port, heartbeat_s=60), fleet="bench", device_id="ready", outbox=ob)
    link.start()
    ob.put(p)
    accepted = time.perf_counter() - t0
    while link.state.acked < 1:
        time.sleep(0.001)
    published = time.perf_counter() - t0
    link.stop()
    ob.close()
    return {"fill_s": filled, "accept_s": accepted, "first_puback_s": published}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=20_000)
    ap.add_argument("--payload", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ready-backlog", type=int, default=1_000_000, help="0 skips that measurement")
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    args = ap.parse_args()

    payloads = [body(i, args.payload) for i in range(args.results)]
    messages = [envelope(i, p) for i, p in enumerate(payloads)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = Broker(args.mosquitto, d)
        try:
            raw, eg = [], []
            for i in range(args.reps):  # alternate which goes first, so neither always runs on a warm cache
                if i % 2:
                    eg.append(bench_link(broker.port, d, payloads))
                    raw.append(bench_raw(broker.port, messages))
                else:
                    raw.append(bench_raw(broker.port, messages))
                    eg.append(bench_link(broker.port, d, payloads))
            r, e = statistics.median(x[0] for x in raw), statistics.median(x[0] for x in eg)
            rc, ec = statistics.median(x[1] for x in raw), statistics.median(x[1] for x in eg)
            print(f"backlog drain at QoS 1, {args.results} results, median of {args.reps} (local mosquitto)")
            print(f"  raw paho, from memory:         {r:8.0f} msg/s   client CPU {rc * 1e6:5.1f} us/msg")
            print(
                f"  EdgeGuard outbox -> MqttLink:  {e:8.0f} msg/s   client CPU {ec * 1e6:5.1f} us/msg"
                f"   ratio {e / r:.2f}x (rate), {rc / ec:.2f}x (CPU per message)"
            )
            print(
                "  per-run ratios: " + " ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(eg, raw, strict=False))
            )
            if args.ready_backlog:
                s = bench_ready(broker.port, d, args.ready_backlog, args.payload)
                print(f"ready with {args.ready_backlog} queued results (filled in {s['fill_s']:.0f} s):")
                print(
                    f"  open + link start -> put() durable {s['accept_s'] * 1e3:.0f} ms, "
                    f"first queued result acknowledged by the broker {s['first_puback_s'] * 1e3:.0f} ms"
                )
        finally:
            broker.stop()
    print(f"(machine: {os.cpu_count()} CPUs; figures are noisy on a shared machine: compare the ratios)")


if __name__ == "__main__":
    main()
