"""`edgeguard fleet exporter`: a real scrape (HTTP GET /metrics) after simulated heartbeats on mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgeguard.fleet.view import FleetState
from edgeguard.fleet.view._exporter import FleetCollector
from tests.fleet._sim import ROOT, SimFleet
from tests.support.broker import MosquittoBroker, free_port

BrokerFactory = Callable[..., MosquittoBroker]
DASHBOARD = ROOT / "examples" / "grafana-fleet-dashboard.json"


def _scrape(port: int) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _by_device(samples: list[Sample]) -> dict[str, float]:
    return {s.labels["device"]: s.value for s in samples}


def test_a_real_scrape_reports_every_simulated_device_with_its_labels(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(extra_config="max_connections -1\n")
    port = free_port()
    args = ("--fleet", "fx", "--heartbeat", "0.3", "--keepalive", "10", "--groups", "line-a")
    with SimFleet(broker, 5, *args) as sim:
        sim.expect("ready 5")
        exporter = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "fleet", "exporter", "--broker", f"127.0.0.1:{broker.port}",
             "--fleet", "fx", "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert exporter.stdout is not None
            assert exporter.stdout.readline().startswith("serving metrics on http://127.0.0.1:")
            deadline = time.monotonic() + 15
            # Two heartbeats per device give a rate; wait on that condition, not on a fixed time.
            while True:
                metrics = _scrape(port)
                rates = _by_device(metrics.get("edgeguard_inference_rate_per_second", []))
                if len(rates) == 5 or time.monotonic() > deadline:
                    break
            sim.send("drop sim-0004")
            sim.expect("dropped sim-0004")
            while True:
                after = _scrape(port)
                gone = _by_device(after["edgeguard_device_up"]).get("sim-0004") == 0.0
                if gone or time.monotonic() > deadline:
                    break
        finally:
            exporter.terminate()
            exporter.wait(10)
    devices = {f"sim-{i:04d}" for i in range(5)}
    assert set(rates) == devices
    assert _by_device(metrics["edgeguard_device_up"]) == dict.fromkeys(devices, 1.0)
    first = metrics["edgeguard_inferences_total"][0]
    assert first.labels == {
        "fleet": "fx", "device": first.labels["device"], "group": "line-a", "model": "detector"
    }
    assert set(_by_device(metrics["edgeguard_inferences_total"])) == devices
    p99 = [s for s in metrics["edgeguard_inference_latency_seconds"] if s.labels["quantile"] == "0.99"]
    assert len(p99) == 5 and all(0 < s.value < 1 for s in p99)  # ms on the wire, seconds in Prometheus
    info = metrics["edgeguard_model_info"][0].labels
    assert (info["version"], info["accelerator"]) == ("3", "cpu")
    fleet = {s.labels["state"]: s.value for s in metrics["edgeguard_fleet_devices"]}
    assert fleet == {"online": 5.0, "offline": 0.0}
    assert _by_device(after["edgeguard_device_up"])["sim-0004"] == 0.0
    states = {s.labels["state"]: s.value for s in after["edgeguard_fleet_devices"]}
    assert states == {"online": 4.0, "offline": 1.0}


def test_one_scrape_is_one_snapshot_taken_under_one_lock() -> None:
    """Every family of one collect() comes from the same snapshot: a heartbeat that lands while the
    families are built does not show up in some of them."""
    state = FleetState()
    hb = {"model": {"name": "m", "version": 1}, "inferences": 10, "uptime_s": 1.0, "outbox": {"depth": 3}}
    state.ingest("edgeguard/v1/f/d1/heartbeat", json.dumps(hb).encode(), 100.0)
    collector = FleetCollector(state, wall=lambda: 101.0)
    families = collector.collect()
    first = next(families)  # the snapshot is taken before the first family is yielded
    state.ingest("edgeguard/v1/f/d2/heartbeat", json.dumps(hb).encode(), 100.5)
    rest = list(families)
    devices = {s.labels.get("device") for f in [first, *rest] for s in f.samples if "device" in s.labels}
    assert devices == {"d1"}
    assert next(f for f in rest if f.name == "edgeguard_heartbeat_age_seconds").samples[0].value == 1.0


def test_metric_names_follow_prometheus_conventions_and_the_dashboard_uses_only_them() -> None:
    state = FleetState()
    hb = {"model": {"name": "m", "version": 1}, "inferences": 10, "uptime_s": 1.0, "latency_ms": {"p50": 2.0,
          "p99": 5.0}, "outbox": {"depth": 3, "dropped_total": 0, "oldest_age_s": 1.5}, "rejected": 0,
          "supervisor": {"restarts": 1, "mtbf_s": 60.0, "mttr_s": 2.0}}
    state.ingest("edgeguard/v1/f/d1/status", b'{"state": "online"}', 99.0)
    state.ingest("edgeguard/v1/f/d1/heartbeat", json.dumps(hb).encode(), 100.0)
    hb |= {"inferences": 20, "uptime_s": 2.0}
    state.ingest("edgeguard/v1/f/d1/heartbeat", json.dumps(hb).encode(), 101.0)  # a rate needs two
    names: set[str] = set()
    for family in FleetCollector(state, wall=lambda: 101.0).collect():
        assert family.name.startswith("edgeguard_")
        for sample in family.samples:
            names.add(sample.name)
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created"))
    assert {"edgeguard_inferences_total", "edgeguard_restarts_total", "edgeguard_outbox_dropped_total",
            "edgeguard_outbox_depth", "edgeguard_heartbeat_age_seconds", "edgeguard_mtbf_seconds"} <= names
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    import re

    used = {m for e in exprs for m in re.findall(r"\bedgeguard_[a-z0-9_]+", e)}
    assert used and used <= names, used - names


def test_the_exporter_needs_a_free_address_and_says_so_in_one_line(broker_factory: BrokerFactory,
                                                                   tmp_path: Path) -> None:
    broker = broker_factory()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "edgeguard", "fleet", "exporter", "--broker", f"127.0.0.1:{broker.port}",
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
