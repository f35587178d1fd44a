#!/usr/bin/env python3
"""How many devices one `fleet status`/`watch`/exporter process can follow, and its memory per device.

    python tools/fleet_view_bench.py 1000 3000 5000 --heartbeat 30
    python tools/fleet_view_bench.py 500 1000 --heartbeat 10 --broker-kind mosquitto --broker-kind rabbitmq \
        --broker-kind nats                     # the same sizes through each broker, side by side

For each broker kind and fleet size N: a fresh broker (mosquitto: max_connections -1; RabbitMQ: a node of
its own with the MQTT plugin; nats-server: JetStream + MQTT; the launchers of tests/support/brokers.py;
RLIMIT_NOFILE raised), tools/fleet_sim.py N in a
child process (heartbeat every --heartbeat s, every device's first heartbeat within the same second: the
harshest burst), and in this process the view itself (Follower + FleetState, as the CLI uses them). Measured
over --cycles heartbeat periods after every device has been seen once:
  lag       arrival time minus the heartbeat's own `time` (same machine, same clock): p50 / p99 / max;
            the view keeps up while max lag < one heartbeat period
  missing   devices none of whose heartbeats arrived in the last 1.5 periods
  rss/dev   the view process's resident memory growth (kB) per device followed
Prints one line per broker and N, a side-by-side table when more than one broker kind ran, and a JSON summary
at the end. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeguard.fleet.view import BrokerOptions, FleetState, Follower  # noqa: E402

KINDS = ("mosquitto", "rabbitmq", "nats")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LagFollower(Follower):
    """The view plus a record of each heartbeat's lag (parsing the time again costs a little; measured)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.lags: list[tuple[float, str, float]] = []  # (arrival, device, lag)
        self._lag_lock = threading.Lock()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        super()._on_message(c, u, msg)
        if msg.topic.endswith("/heartbeat"):
            now = time.time()
            try:
                sent = float(json.loads(msg.payload)["time"])
            except (ValueError, KeyError, TypeError):
                return
            with self._lag_lock:
                self.lags.append((now, msg.topic.split("/")[3], now - sent))


class _Mosquitto:
    def __init__(self, work: Path, n: int, binary: str) -> None:
        self.port = _free_port()
        conf = work / f"mosquitto-{n}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"
                        "user root\nlog_dest none\npersistence false\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], preexec_fn=_raise_nofile)  # noqa: PLW1509
        self.start_s: float | None = None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _start_broker(kind: str, n: int, args: argparse.Namespace, work: Path) -> Any:
    if kind == "mosquitto":
        return _Mosquitto(work, n, args.mosquitto)
    # The launchers the tests use (private node / server on free ports); imported by name, so that the type
    # check of tools/ does not extend into tests/.
    launchers = importlib.import_module("tests.support.brokers")
    cls = launchers.RabbitMqBroker if kind == "rabbitmq" else launchers.NatsBroker
    return cls(work / f"{kind}-{n}")


def run_one(n: int, args: argparse.Namespace, work: Path, kind: str = "mosquitto") -> dict[str, Any]:
    broker = _start_broker(kind, n, args, work)
    port = int(broker.port)
    sim: subprocess.Popen[str] | None = None
    follower: LagFollower | None = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        state = FleetState()
        follower = LagFollower(broker=BrokerOptions(port=port), fleet="bench", state=state)
        follower.start()
        rss0 = _rss_kb()
        sim = subprocess.Popen(
            [sys.executable, str(ROOT / "tools/fleet_sim.py"), str(n), "--broker", f"127.0.0.1:{port}",
             "--fleet", "bench", "--heartbeat", str(args.heartbeat),
             "--keepalive", str(int(args.heartbeat * 2)), "--results-every", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert sim.stdout is not None
        t0 = time.monotonic()
        line = sim.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"simulator: {line!r}")
        connect_s = time.monotonic() - t0
        while state.heartbeats_seen() < n:
            if time.monotonic() - t0 > args.heartbeat * 3 + 60:
                raise RuntimeError(f"only {state.heartbeats_seen()}/{n} devices seen")
            time.sleep(0.2)
        start = time.time()
        t0_wall = time.time() - (time.monotonic() - t0)
        time.sleep(args.heartbeat * args.cycles)
        end = time.time()
        with follower._lag_lock:
            window = [(a, d, lag) for a, d, lag in follower.lags if start <= a < end]
        # A device is missing when none of its heartbeats arrived in the last 1.5 periods (the simulator's
        # period drifts by its own loop time, so exactly one period could miss a punctual device).
        last_period = {d for a, d, _ in window if a >= end - 1.5 * args.heartbeat}
        lags = sorted(lag for _, _, lag in window)
        rss = _rss_kb()
        # Sent (the simulator's count) against received (ours), over the whole run: tells a simulator that
        # cannot keep its period apart from messages lost between the simulator and the view.
        assert sim.stdin is not None
        sim.stdin.write("stats\n")
        sim.stdin.flush()
        sent = int(sim.stdout.readline().split()[1].split("=")[1])
        time.sleep(2)  # let what was sent before the count arrive
        with follower._lag_lock:
            received = len(follower.lags)
        return {
            "broker": kind,
            "broker_start_s": None if broker.start_s is None else round(broker.start_s, 2),
            "devices": n,
            "connect_s": round(connect_s, 2),
            "heartbeats": len(window),
            "lag_p50_s": round(statistics.median(lags), 3) if lags else None,
            "lag_p99_s": round(lags[int(len(lags) * 0.99) - 1], 3) if lags else None,
            "lag_max_s": round(lags[-1], 3) if lags else None,
            "missing_last_period": n - len(last_period),
            "sent_total": sent,
            "received_total": received,
            "expected_total": int(n * (end - t0_wall) / args.heartbeat),
            "keeps_up": bool(lags) and lags[-1] < args.heartbeat and len(last_period) == n,
            "rss_kb_per_device": round((rss - rss0) / n, 2),
            "dropped": state.dropped,
        }
    finally:
        if follower is not None:
            follower.stop()
        if sim is not None:
            sim.kill()
            sim.wait()
        broker.kill()


def _side_by_side(results: list[dict[str, Any]], kinds: list[str]) -> None:
    """One row per fleet size, one column group per broker: lag p99 / max, missing, kB per device."""
    by = {(r["broker"], r["devices"]): r for r in results}
    print(f"{'devices':>8} | " + " | ".join(f"{k:^34}" for k in kinds))
    head = f"{'p99 s':>7} {'max s':>7} {'miss':>5} {'kB/dev':>7} {'ok':>3}"
    print(f"{'':>8} | " + " | ".join(head for _ in kinds))
    for n in sorted({r["devices"] for r in results}):
        cells = []
        for k in kinds:
            r = by.get((k, n))
            if r is None:
                cells.append(f"{'-':>34}")
                continue
            ok = "yes" if r["keeps_up"] else "no"
            cells.append(
                f"{r['lag_p99_s']!s:>7} {r['lag_max_s']!s:>7} {r['missing_last_period']:>5} "
                f"{r['rss_kb_per_device']:>7} {ok:>3}"
            )
        print(f"{n:>8} | " + " | ".join(cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sizes", type=int, nargs="+", help="fleet sizes to try, in order")
    p.add_argument("--heartbeat", type=float, default=30.0, metavar="S")
    p.add_argument("--cycles", type=int, default=2, help="heartbeat periods measured per size")
    p.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    p.add_argument("--broker-kind", action="append", choices=KINDS, metavar="|".join(KINDS),
                   help="broker to measure through (repeatable: the kinds run one after the other and are "
                        "reported side by side; default mosquitto)")
    args = p.parse_args()
    kinds = args.broker_kind or ["mosquitto"]
    _raise_nofile()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-view-bench-") as tmp:
        for kind, n in ((k, n) for k in kinds for n in args.sizes):
            if any(r["broker"] == kind and not r["keeps_up"] for r in results):
                continue  # this broker already fell behind at a smaller size
            r = run_one(n, args, Path(tmp), kind)
            results.append(r)
            print(
                f"{kind:9s} {n:6d} devices: broker start {r['broker_start_s']} s, "
                f"connect {r['connect_s']} s, "
                f"lag p50 {r['lag_p50_s']} s p99 {r['lag_p99_s']} s "
                f"max {r['lag_max_s']} s, missing {r['missing_last_period']}, "
                f"{r['rss_kb_per_device']} kB/device, heartbeats sent {r['sent_total']} received "
                f"{r['received_total']}, keeps up: {r['keeps_up']}",
                flush=True,
            )
    if len(kinds) > 1:
        _side_by_side(results, kinds)
    print(json.dumps({"heartbeat_s": args.heartbeat, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
