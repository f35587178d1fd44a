"""Scale, proven: one simulated fleet (tools/fleet_sim.py, 200 devices by default) on a private mosquitto,
shared by every test of this module, looked at by the operator's tools as an operator runs them.

The devices are a provisioned fleet directory's (`fleet init` + `fleet add-device`): signed commands checked
by each device's own gatekeeper and answered with its own key, which `fleet send` pins (`--device-keys`).
``EDGEGUARD_SCALE_DEVICES=1000`` runs the same module at 1,000 devices (not by default: the shared 2-core
development machine takes minutes for it). Tests may run in any order: a test that drops a device records it
in ``ScaleFleet.dropped`` and every count is taken against that."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeguard.fleet.view import BrokerOptions, FleetEvent, FleetState, Follower
from tests.fleet._dashboard import DashboardProc, artifacts, chromium, login, token_file
from tests.fleet._fleet import ok
from tests.fleet._sim import SimFleet, edgeguard
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

COUNT = int(os.environ.get("EDGEGUARD_SCALE_DEVICES", "200"))
HEARTBEAT_S = 2.0
KEEPALIVE_S = 10
WAIT_S = 120.0  # generous deadlines for what must happen; the bounds are asserted separately


@dataclass
class ScaleFleet:
    broker: MosquittoBroker
    fleet_dir: Path
    sim: SimFleet
    names: list[str]
    dropped: set[str] = field(default_factory=set)

    @property
    def fleet(self) -> str:
        return "plant"

    @property
    def where(self) -> tuple[str, ...]:
        return ("--broker", f"{self.broker.host}:{self.broker.port}", "--fleet", self.fleet)


@pytest.fixture(scope="module")
def scale_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleFleet]:
    tmp = tmp_path_factory.mktemp("scale")
    fleet_dir = tmp / "plant"
    names = [f"sim-{i:04d}" for i in range(COUNT)]
    ok("fleet", "init", fleet_dir, "--broker", "127.0.0.1:8883", "--group", "line-1")
    ok("fleet", "add-device", "-f", fleet_dir, *names, "--group", "line-1")
    shutil.rmtree(fleet_dir / "archives")  # COUNT sealed archives nobody here installs
    with MosquittoBroker(tmp, extra_config="max_connections -1\n") as broker, SimFleet(
        broker, COUNT, "--fleet-dir", str(fleet_dir), "--heartbeat", str(HEARTBEAT_S),
        "--keepalive", str(KEEPALIVE_S), "--results-every", "5",
    ) as sim:
        sim.expect(f"ready {COUNT}", timeout=scaled(WAIT_S))
        yield ScaleFleet(broker=broker, fleet_dir=fleet_dir, sim=sim, names=names)


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_status_json_lists_every_simulated_device_within_5_s(scale_fleet: ScaleFleet) -> None:
    started = time.monotonic()
    out = edgeguard("fleet", "status", *scale_fleet.where, "--json", timeout=WAIT_S)
    took = time.monotonic() - started
    assert out.returncode in (0, 1), out.stderr  # 1 once a device was dropped by another test
    doc = json.loads(out.stdout)
    views = {d["device"]: d for d in doc["devices"]}
    assert set(views) == set(scale_fleet.names)
    online = set(scale_fleet.names) - scale_fleet.dropped
    assert {d for d, v in views.items() if v["online"]} == online
    assert doc["online"] == len(online) and doc["total"] == COUNT
    assert all(views[d]["model"] == "detector" and views[d]["heartbeat_age_s"] is not None for d in online)
    assert doc["ok"] is (not scale_fleet.dropped)
    # The whole command, interpreter start to JSON printed, at this machine's speed (tests/support/slowdown).
    assert took <= scaled(5.0), f"fleet status took {took:.2f} s for {COUNT} devices"


def test_a_device_killed_without_disconnect_is_offline_within_1_5_keepalives(scale_fleet: ScaleFleet) -> None:
    victim = "sim-0042"
    seen_at: list[float] = []

    def on_event(event: FleetEvent) -> None:
        if event.device == victim and event.kind == "offline":
            seen_at.append(time.monotonic())

    state = FleetState()
    follower = Follower(broker=BrokerOptions(port=scale_fleet.broker.port), fleet=scale_fleet.fleet,
                        state=state, on_event=on_event)
    follower.start()
    try:
        assert _wait(lambda: len(state) == COUNT, scaled(WAIT_S)), f"the view saw {len(state)} devices"
        # The socket closed without DISCONNECT, as when the device's process is killed.
        scale_fleet.sim.send(f"drop {victim}")
        scale_fleet.sim.expect(f"dropped {victim}", timeout=WAIT_S)
        scale_fleet.dropped.add(victim)
        killed = time.monotonic()
        assert _wait(lambda: bool(seen_at), WAIT_S), "the dropped device never went offline"
        views = {v.device: v for v in state.snapshot()}
    finally:
        follower.stop()
    took = seen_at[0] - killed
    # keepalive x 1.5 (MQTT 3.1.1 §3.1.2.10) plus one scaled second of this machine's own work.
    assert took <= KEEPALIVE_S * 1.5 + scaled(1.0), f"offline after {took:.2f} s"
    assert views[victim].online is False
    assert {d for d, v in views.items() if v.online} == set(scale_fleet.names) - scale_fleet.dropped


def test_signed_ping_to_all_gets_every_answer_each_verified(scale_fleet: ScaleFleet) -> None:
    fd = scale_fleet.fleet_dir
    out = edgeguard("fleet", "send", "ping", "--to", "all", "--sign-key", str(fd / "keys/operator.key"),
                    *scale_fleet.where, "--device-keys", str(fd / "devices"), "--timeout", str(WAIT_S),
                    "--json", timeout=WAIT_S + 60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    doc = json.loads(out.stdout)
    answers: list[dict[str, Any]] = doc["answers"]
    online = set(scale_fleet.names) - scale_fleet.dropped
    assert {a["device"] for a in answers} == online  # `all` is every online device: the dropped one is not
    assert all(a["verdict"] == "verified" for a in answers)  # each with the device's pinned key
    assert all(a["answer"]["ok"] is True and a["answer"]["result"] == {"pong": True} for a in answers)
    assert all(not a["forged"] for a in answers) and doc["ok"] is True


def test_dashboard_in_chromium_counts_every_simulated_device(
    scale_fleet: ScaleFleet, tmp_path: Path
) -> None:
    shots = artifacts(tmp_path, "scale")
    token_path, token = token_file(tmp_path)
    broker = scale_fleet.broker
    with DashboardProc(broker, scale_fleet.fleet, token_path) as dash, chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        login(page, dash.url, token)
        page.wait_for_function("n => document.getElementById('count-all').textContent === String(n)",
                               arg=COUNT, timeout=WAIT_S * 1000)
        online = COUNT - len(scale_fleet.dropped)
        page.wait_for_function(
            "n => document.getElementById('count-online').textContent === String(n)", arg=online,
            timeout=WAIT_S * 1000)
        counts = {k: int(page.inner_text(f"#count-{k}")) for k in ("all", "online", "degraded", "offline")}
        assert counts == {"all": COUNT, "online": online, "degraded": 0, "offline": len(scale_fleet.dropped)}
        rows = page.evaluate("() => document.querySelectorAll('#rows tr.dev').length")
        assert 0 < rows <= COUNT  # only the rows in view are rendered
        page.screenshot(path=str(shots / f"scale-{COUNT}.png"))
    assert (shots / f"scale-{COUNT}.png").stat().st_size > 10_000
