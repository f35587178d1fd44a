"""`edgeguard fleet dashboard` in a real browser (Debian chromium, headless, driven by Playwright) against a
private mosquitto, simulated devices (tools/fleet_sim.py) and one real device service with signed commands.
Screenshots are kept as artefacts ($EDGEGUARD_ARTIFACTS, else the test's tmp dir)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from paho.mqtt import publish

from tests.commands._support import FLEET, commands_device
from tests.fleet._dashboard import DashboardProc, artifacts, chromium, login, token_file
from tests.fleet._sim import SimFleet
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

SIMULATED = 24
HEARTBEAT_S = 2.0
WAIT_MS = 60_000  # generous deadlines for what must happen; the 2-heartbeat bound is asserted separately


def _rollout(now: float) -> dict[str, Any]:
    """Rollout progress as the rollout tool publishes it (the deploy contract): wave 2 failed probation on
    sim-0012 and sim-0013, which rolled back; the rollout halted."""
    return {
        "v": 1, "id": "detector-v4", "model": "detector", "version": 4, "sha256": "ab" * 32,
        "group": "line-1",
        "state": "halted", "max_failures": 1, "failures": 2, "started": now - 300, "updated": now,
        "reason": "probation failed on 2 devices (max 1): rolled back",
        "waves": [
            {"index": 0, "percent": 10, "devices": ["sim-0001", "sim-0002"], "state": "passed",
             "probation_until": None, "ok": ["sim-0001", "sim-0002"], "failed": {}, "rolled_back": []},
            {"index": 1, "percent": 40, "devices": ["sim-0010", "sim-0011", "sim-0012", "sim-0013"],
             "state": "failed", "probation_until": now + 45, "ok": ["sim-0010", "sim-0011"],
             "failed": {"sim-0012": "error rate 0.21 > 0.05", "sim-0013": "p95 88 ms > 50 ms"},
             "rolled_back": ["sim-0012", "sim-0013"]},
            {"index": 2, "percent": 100, "devices": ["sim-0020", "sim-0021"], "state": "pending",
             "probation_until": None, "ok": [], "failed": {}, "rolled_back": []},
        ],
    }


def test_dashboard_in_chromium_counts_offline_rollback_signed_ping_and_401(tmp_path: Path) -> None:
    shots = artifacts(tmp_path, "dashboard")
    (tmp_path / "dev").mkdir()
    with MosquittoBroker(tmp_path) as broker:
        dev, _ops = commands_device(tmp_path / "dev", broker, groups=("line-1",))
        dev.start()
        try:
            dev.wait_ready()
            _run(tmp_path, broker, shots)
        finally:
            dev.stop()


def _run(tmp_path: Path, broker: MosquittoBroker, shots: Path) -> None:
    token_path, token = token_file(tmp_path)
    device_key = tmp_path / "dev/state/device-sign.pub"
    with SimFleet(broker, SIMULATED, "--fleet", FLEET, "--heartbeat", str(HEARTBEAT_S), "--groups", "line-1",
                  "--keepalive", "10") as sim:
        sim.expect(f"ready {SIMULATED}", timeout=90)
        sim.send("degrade sim-0005 <img src=x onerror=window.__pwned=1> npu throttled")
        with DashboardProc(broker, FLEET, token_path, "--sign-key", str(tmp_path / "dev/ops/operator.key"),
                           "--device-keys", f"dev-1={device_key}") as dash:
            # Without the token: 401 for the page, the state, the stream and the actions.
            for path in ("/", "/api/state", "/api/events", "/static/dashboard.js"):
                assert dash.get(path)[0] == 401, path
            assert dash.get("/api/state", token="x" * 43)[0] == 401
            status, state = dash.get("/api/state", token=token)
            assert status == 200 and state["actions"] is True

            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                login(page, dash.url, token)
                sim.send("event sim-0007 bundle-rejected")  # events are not retained: sent while watched
                total = SIMULATED + 1
                page.wait_for_function(
                    "n => document.getElementById('count-all').textContent === String(n)", arg=total,
                    timeout=WAIT_MS)
                page.wait_for_selector("tr[data-device='sim-0005'][data-status=degraded]", timeout=WAIT_MS)
                page.wait_for_selector("#security li:has-text('bundle-rejected')", timeout=WAIT_MS)
                assert _counts(page) == {"online": total - 1, "degraded": 1, "offline": 0}
                # A device's text is text: the reason shows as typed, its markup never runs.
                assert "<img src=x" in page.inner_text("tr[data-device='sim-0005'] td.problem")
                assert page.evaluate("window.__pwned") is None
                page.screenshot(path=str(shots / "01-overview.png"))

                # A device dropped (no DISCONNECT): red within 2 heartbeats.
                sim.send("drop sim-0003")
                sim.expect("dropped sim-0003", timeout=30)
                dropped_at = time.monotonic()
                page.wait_for_selector("tr[data-device='sim-0003'][data-status=offline]", timeout=WAIT_MS)
                took = time.monotonic() - dropped_at
                assert took <= scaled(2 * HEARTBEAT_S), f"offline shown after {took:.1f} s"
                page.wait_for_function("() => document.getElementById('count-offline').textContent === '1'",
                                       timeout=WAIT_MS)
                assert _counts(page) == {"online": total - 2, "degraded": 1, "offline": 1}
                # Read in one go: the table is redrawn every second, an element found earlier may be gone.
                device, colour = page.evaluate("""() => {
                    const row = document.querySelector('#rows tr.dev');
                    const text = row.querySelector('.status-text');
                    return [row.dataset.device, getComputedStyle(text).color]; }""")
                assert device == "sim-0003"  # worst first
                assert colour == "rgb(248, 81, 73)"  # the one red: offline

                # A rollout that rolled devices back.
                publish.single(f"edgeguard/v1/{FLEET}/rollouts/detector-v4",
                               json.dumps(_rollout(time.time())), qos=1, retain=True,
                               hostname=broker.host, port=broker.port)
                page.wait_for_selector(".rollout[data-rollout='detector-v4']", timeout=WAIT_MS)
                text = page.inner_text(".rollout[data-rollout='detector-v4']")  # redrawn each second
                assert "halted" in text and "rolled back: sim-0012, sim-0013" in text
                assert "2 rolled back" in text and "2/4 ok" in text
                # A running rollout: its wave's probation timer counts down.
                running = _rollout(time.time()) | {"id": "sensor-v2", "model": "sensor", "version": 2,
                                                   "state": "running", "failures": 0, "reason": None}
                running["waves"] = [running["waves"][0] | {"state": "probation",
                                                           "probation_until": time.time() + 600}]
                publish.single(f"edgeguard/v1/{FLEET}/rollouts/sensor-v2", json.dumps(running), qos=1,
                               retain=True, hostname=broker.host, port=broker.port)
                note = ".rollout[data-rollout='sensor-v2'] .wave-note"
                page.wait_for_selector(f"{note}:has-text('min left')", timeout=WAIT_MS)
                assert re.search(r"probation (9|10) min left", page.inner_text(note))  # 600 s ahead, just now
                page.screenshot(path=str(shots / "02-offline-and-rollback.png"))

                # A site group from two members' heartbeats (sources.group): share, load, why one left,
                # the stream holder. Not retained: the dashboard sees them live.
                cam = {"cam-1": {"holder": "grp-a", "fencing_token": 2, "serving": True, "takeovers": 1}}
                members = (("grp-a", "joined", None, 30), ("grp-b", "left", "no model", 10))
                for d, share, why, served in members:
                    site = {"group": "line-9", "share": share, "reason": why, "served": served,
                            "redelivered": 0, "streams": cam if d == "grp-a" else {}}
                    publish.single(f"edgeguard/v1/{FLEET}/{d}/heartbeat",
                                   json.dumps({"state": "serving", "sources": {"group": site}}), qos=1,
                                   hostname=broker.host, port=broker.port)
                page.wait_for_selector(".group[data-group='line-9'] .member[data-member='grp-b']",
                                       timeout=WAIT_MS)
                text = page.inner_text(".group[data-group='line-9']")
                assert "1/2 in share" in text and "75%" in text and "25%" in text and "no model" in text
                assert "failovers 1" in text and "cam-1 @ grp-a #2" in text

                # A signed ping to the real device; its answer verified with the pinned key.
                page.fill("#filter", "dev-1")
                page.wait_for_function(
                    "() => document.querySelectorAll('#rows tr.dev').length === 1", timeout=WAIT_MS)
                page.click("tr[data-device='dev-1']")
                page.wait_for_selector("#d-title:has-text('dev-1')", timeout=WAIT_MS)
                page.click("#d-actions button[data-action=ping]")
                answer = page.wait_for_selector("#d-answers li[data-verdict=verified]", timeout=WAIT_MS)
                assert "✓ ping · verified" in answer.inner_text() and '{"pong":true}' in answer.inner_text()
                page.screenshot(path=str(shots / "03-device-detail-signed-ping.png"))

                # A simulated device's detail: its last results and events, the degraded reason.
                page.click("#d-close")
                page.fill("#filter", "sim-0005")
                page.click("tr[data-device='sim-0005']")
                page.wait_for_selector("#d-results li code:has-text('outputs')", timeout=WAIT_MS)
                assert "degraded: <img src=x" in page.inner_text("#d-problems")
                page.screenshot(path=str(shots / "04-device-detail-results.png"))
            # Results and rollout progress ride the view's session without counting as refused messages.
            status, state = dash.get("/api/state", token=token)
            assert status == 200 and state["dropped"] == 0 and state["rollouts_rejected"] == 0
        assert list(shots.glob("*.png")) and all(p.stat().st_size > 10_000 for p in shots.glob("*.png"))


def _counts(page: Any) -> dict[str, int]:
    return {k: int(page.inner_text(f"#count-{k}")) for k in ("online", "degraded", "offline")}
