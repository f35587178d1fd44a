#!/usr/bin/env python3
"""`edgeguard fleet dashboard` at N simulated devices: page load and update latency in a real browser.

    python tools/bench_dashboard.py 1000 --heartbeat 30 --probes 30

A fresh mosquitto (max_connections -1), tools/fleet_sim.py N (heartbeat every --heartbeat s), the real
`edgeguard fleet dashboard` in a child process, and Debian's chromium (headless, Playwright). Measured:
  load      a fresh page (already signed in) until the table shows every device: median / max over --loads
  update    a heartbeat published for a probe device (its outbox depth set to a new value) until that value
            is in the page's DOM (time taken in the page, same machine clock): p50 / p95 / max over --probes,
            beside the raw MQTT delivery of the same messages to a plain paho subscriber on the same broker
            (the floor: what the broker and the network stack cost without the dashboard)
  snapshot  the size of the JSON the page starts from, and the dashboard process's resident memory
Prints one line per measurement and a JSON summary. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLEET = "bench"
PROBE = "bench-probe"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"mosquitto did not listen on {port} within {timeout} s") from None
            time.sleep(0.05)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if line.startswith(prefix):
            return line
    raise SystemExit(f"no {prefix!r} line within {timeout} s")


def _heartbeat(depth: int) -> bytes:
    return json.dumps({
        "model": {"name": "detector", "version": 3}, "state": "serving", "degraded": False,
        "inferences": depth, "uptime_s": float(depth), "latency_ms": {"p50": 3.0, "p99": 7.0},
        "outbox": {"depth": depth}, "time": time.time(),
    }).encode()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RawSubscriber:
    """The floor: a plain paho client on the probe's heartbeat topic, arrival times by depth."""

    def __init__(self, port: int) -> None:
        self.arrived: dict[int, float] = {}
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_a: c.subscribe(f"edgeguard/v1/{FLEET}/{PROBE}/heartbeat", 0)
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.arrived[int(json.loads(msg.payload)["outbox"]["depth"])] = time.time()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("devices", type=int, nargs="?", default=1000)
    p.add_argument("--heartbeat", type=float, default=30.0, metavar="S", help="simulated heartbeat period")
    p.add_argument("--probes", type=int, default=30, help="update latency samples")
    p.add_argument("--loads", type=int, default=5, help="page load samples")
    p.add_argument("--screenshot", type=Path, metavar="PNG", help="save the loaded page at N devices here")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\nuser root\n"
                    "log_dest none\npersistence false\n")
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token + "\n")
    (work / "token").chmod(0o600)
    procs: list[subprocess.Popen[str]] = []
    try:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], text=True))
        _wait_port(port, 30)
        sim = subprocess.Popen(
            [sys.executable, str(ROOT / "tools/fleet_sim.py"), str(args.devices),
             "--broker", f"127.0.0.1:{port}", "--fleet", FLEET, "--heartbeat", str(args.heartbeat),
             "--keepalive", "60", "--groups", "line-1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(sim)
        _wait_line(sim, "ready", 300)
        threading.Thread(target=lambda: sim.stdout and sim.stdout.read(), daemon=True).start()
        dash = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "fleet", "dashboard", "--broker", f"127.0.0.1:{port}",
             "--fleet", FLEET, "--token-file", str(work / "token"), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        procs.append(dash)
        url = _wait_line(dash, "dashboard on ", 60).split()[2]
        threading.Thread(target=lambda: dash.stdout and dash.stdout.read(), daemon=True).start()
        raw = RawSubscriber(port)
        raw.ready.wait(10)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish(f"edgeguard/v1/{FLEET}/{PROBE}/heartbeat", _heartbeat(0), qos=0).wait_for_publish()
        total = args.devices + 1
        req = urllib.request.Request(url + "api/state", headers={"Authorization": f"Bearer {token}"})
        # Heartbeats are not retained: wait until every device has sent one the dashboard saw (a page of
        # devices with figures and sparklines is the page to measure, not one of bare statuses).
        deadline = time.monotonic() + 2 * args.heartbeat + 60
        while True:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
            beating = sum(1 for d in json.loads(body)["devices"] if d["last_heartbeat"] is not None)
            if beating >= total or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        snapshot_bytes = len(body)
        print(f"heartbeats seen from {beating} of {total} devices")
        results: dict[str, Any] = {"devices": args.devices, "heartbeat_s": args.heartbeat,
                                   "snapshot_kb": round(snapshot_bytes / 1024, 1)}
        print(f"snapshot  {snapshot_bytes / 1024:.0f} kB of JSON for {total} devices")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("#conn[data-state=live]")
            loads = []
            for _ in range(args.loads):
                t0 = time.monotonic()
                page.goto(url)
                page.wait_for_function(
                    "n => document.getElementById('count-all').textContent === String(n) && "
                    "document.querySelectorAll('#rows tr.dev').length > 0", arg=total, timeout=120_000)
                loads.append(time.monotonic() - t0)
            if args.screenshot is not None:
                page.screenshot(path=str(args.screenshot))
            results["load_s"] = {"median": round(statistics.median(loads), 3), "max": round(max(loads), 3)}
            print(f"load      median {statistics.median(loads):.2f} s, max {max(loads):.2f} s "
                  f"({args.loads} loads, {total} devices)")
            page.fill("#filter", PROBE)
            page.wait_for_function("() => document.querySelectorAll('#rows tr.dev').length === 1")
            seen, floor = [], []
            for k in range(1, args.probes + 1):
                sent = time.time()
                pub.publish(f"edgeguard/v1/{FLEET}/{PROBE}/heartbeat", _heartbeat(k), qos=0)
                page.wait_for_function(
                    """v => { const r = document.querySelector("tr[data-device='bench-probe']");
                        const cells = r ? r.querySelectorAll('td') : [];
                        if (cells.length > 7 && cells[7].textContent.trim() === String(v)) {
                            window.__seen = Date.now(); return true; }
                        return false; }""", arg=k, polling="raf", timeout=60_000)
                seen.append(page.evaluate("window.__seen") / 1000 - sent)
                if k in raw.arrived:
                    floor.append(raw.arrived[k] - sent)
                time.sleep(0.37)  # off the 250 ms coalescing rhythm: samples fall anywhere in it
            ms = [s * 1000 for s in seen]
            raw_ms = [s * 1000 for s in floor] or [float("nan")]
            results["update_ms"] = {"p50": round(_pct(ms, 0.5), 1), "p95": round(_pct(ms, 0.95), 1),
                                    "max": round(max(ms), 1)}
            results["raw_mqtt_ms"] = {"p50": round(_pct(raw_ms, 0.5), 1), "p95": round(_pct(raw_ms, 0.95), 1),
                                      "max": round(max(raw_ms), 1)}
            print(f"update    heartbeat published -> in the DOM: p50 {_pct(ms, 0.5):.0f} ms, "
                  f"p95 {_pct(ms, 0.95):.0f} ms, max {max(ms):.0f} ms ({len(ms)} probes)")
            print(f"raw MQTT  same messages to a plain subscriber: p50 {_pct(raw_ms, 0.5):.1f} ms, "
                  f"p95 {_pct(raw_ms, 0.95):.1f} ms (dashboard / raw p50: "
                  f"{_pct(ms, 0.5) / max(_pct(raw_ms, 0.5), 0.001):.0f}x)")
            browser.close()
        results["dashboard_rss_mb"] = round(_rss_mb(dash.pid), 1)
        print(f"memory    dashboard process {results['dashboard_rss_mb']} MB resident at {total} devices")
        results["load_average"] = os.getloadavg()[0]
        print(json.dumps(results))
        pub.loop_stop()
        raw.client.loop_stop()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
