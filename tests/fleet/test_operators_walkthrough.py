"""docs/operators.md "Walkthrough", run as written: its own mosquitto, 200 simulated devices of a provisioned
fleet (tools/fleet_sim.py), one real device service (`edgeguard init` + `edgeguard run`, a real model),
`fleet status`, the dashboard in headless chromium (screenshots kept), a dropped device, a rollout halted by a
failed probation and rolled back, a signed ping to all with pinned keys, the Prometheus exporter scraped with
curl and the Home Assistant discovery configs read with mosquitto_sub.

Changed from the document only: the ports (free ones instead of 1883, 8787, 8791, 9786, also in the broker
port `edgeguard init` writes into board/edgeguard.toml) and the probation (2 s instead of 60). Each line runs
in bash from a scratch directory where `tools` is this checkout's."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet._dashboard import artifacts, chromium, login
from tests.fleet._sim import ROOT
from tests.support.broker import free_port

pytestmark = pytest.mark.timeout(900)
DOC = ROOT / "docs" / "operators.md"
WAIT_S = 180.0  # generous deadlines for what must happen; nothing here asserts a time bound
WAIT_MS = int(WAIT_S * 1000)


def _blocks() -> list[list[str]]:
    text = DOC.read_text().split("## Walkthrough: 200 simulated devices and one real device")[1]
    text = text.split("\n## ")[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [[ln.strip() for ln in b.splitlines() if ln.strip()] for b in blocks]


class Background:
    """A line that ended in `&`: its own process group, its output kept line by line."""

    def __init__(self, line: str, cwd: Path, env: dict[str, str]) -> None:
        self.line = line
        self.proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.output: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"{self.line!r} exited: {''.join(self.output)[-2000:]}"
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"{self.line!r} said no {prefix!r}: {''.join(self.output)[-2000:]}")

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class Walk:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        tmp.mkdir()
        (tmp / "tools").symlink_to(ROOT / "tools")
        self.ports = {"1883": free_port(), "8787": free_port(), "8791": free_port(), "9786": free_port()}
        venv_bin = str(Path(sys.executable).parent)  # `edgeguard`, `python`, `python3` of this environment
        self.env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
        self.env.pop("NOTIFY_SOCKET", None)
        self.background: dict[str, Background] = {}

    def port(self, doc_port: str) -> int:
        return self.ports[doc_port]

    def adapt(self, line: str) -> str:
        for doc_port, port in self.ports.items():
            line = re.sub(rf"\b{doc_port}\b", str(port), line)
        return line.replace("--probation 60", "--probation 2")

    def run(self, line: str) -> subprocess.CompletedProcess[str] | None:
        """One line of the document: typed into the simulator, started in the background, or run."""
        line = self.adapt(line)
        if line.startswith("sim> "):
            self.background["fleet_sim.py"].type(line.removeprefix("sim> "))
            return None
        if line.endswith(" &"):
            cmd = line.removesuffix(" &")
            key = next(k for k in ("mosquitto", "fleet_sim.py", "edgeguard run", "dashboard", "exporter")
                       if k in cmd)
            self.background[key] = Background(cmd, self.dir, self.env)
            return None
        return subprocess.run(["bash", "-c", line], cwd=self.dir, env=self.env, capture_output=True,
                              text=True, timeout=WAIT_S + 120)

    def ok(self, line: str, code: int = 0) -> str:
        out = self.run(line)
        assert out is not None
        said = out.stdout[-3000:] + out.stderr[-3000:]
        assert out.returncode == code, f"{line}\n-> {out.returncode}\n{said}"
        return out.stdout

    def step(self, line: str) -> None:
        """A line started in the background, or run to a successful end."""
        if line.endswith(" &"):
            self.run(line)
        else:
            self.ok(line)

    def close(self) -> None:
        for bg in reversed(self.background.values()):
            bg.stop()


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    w = Walk(tmp_path / "desk")
    try:
        yield w
    finally:
        w.close()


def _until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _status(walk: Walk) -> dict[str, Any]:
    out = walk.run("edgeguard fleet status --broker 127.0.0.1:1883 --fleet plant --json")
    assert out is not None and out.returncode in (0, 1), out.stderr if out else None
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_the_operators_walkthrough_runs_as_written(tmp_path: Path, walk: Walk) -> None:
    shots = artifacts(tmp_path, "operators-walkthrough")
    fleet, real, status, dashboard, drop, rollout, ping, grafana, ha = _blocks()

    # A broker, a fleet of 200 simulated devices.
    for line in fleet:
        walk.step(line)
        if line.startswith("mosquitto "):
            _until(lambda: _listening(walk.port("1883")), "mosquitto listening")
    walk.background["fleet_sim.py"].expect("ready 200")

    # One real device.
    for line in real:
        walk.step(line)
        if line.startswith("edgeguard init "):  # its MQTT broker: the one at 127.0.0.1:1883 on a desk
            cfg = walk.dir / "board/edgeguard.toml"
            cfg.write_text(cfg.read_text().replace("\nport = 1883\n", f"\nport = {walk.port('1883')}\n"))
    try:
        _until(lambda: _status(walk)["online"] == 201, "201 devices online")
    except AssertionError:
        raise AssertionError("".join(walk.background["edgeguard run"].output)[-3000:]) from None
    assert "real-1" in {d["device"] for d in _status(walk)["devices"]}

    (line,) = status
    assert walk.ok(line).splitlines()[0].rstrip() == "OK: 201/201 devices online, none degraded"

    for line in dashboard:
        walk.step(line)
    url = walk.background["dashboard"].expect("dashboard on ").split()[2]
    assert url == f"http://127.0.0.1:{walk.port('8787')}/"
    token = (walk.dir / "dash.token").read_text().strip()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        login(page, url, token)

        def counts(**want: int) -> None:
            for k, n in want.items():
                page.wait_for_function(
                    "([k, n]) => document.getElementById('count-' + k).textContent === String(n)",
                    arg=[k, n], timeout=WAIT_MS)

        counts(all=201, online=201, offline=0)
        # Heartbeats are not retained: each row has its figures once the device's next one (10 s) arrived.
        page.wait_for_selector("#models:has-text('detector v3'):has-text('okay-nabu')", timeout=WAIT_MS)
        page.wait_for_function("() => !document.getElementById('models').textContent.includes('no model')",
                               timeout=WAIT_MS)
        page.screenshot(path=str(shots / "01-201-devices.png"))

        # A device drops.
        typed, problem = drop
        walk.run(typed)
        walk.background["fleet_sim.py"].expect("dropped sim-0042")
        _until(lambda: _status(walk)["online"] == 200, "sim-0042 offline")
        first = walk.ok(problem, code=1).splitlines()[0].rstrip()
        assert first.startswith("PROBLEM: 1/201 devices need attention (1 offline") and "sim-0042" in first
        counts(online=200, offline=1)
        page.wait_for_selector("tr[data-device='sim-0042'][data-status=offline]", timeout=WAIT_MS)
        page.screenshot(path=str(shots / "02-a-device-dropped.png"))

        # A rollout rolls back.
        fetch, seal, fail, start, show = rollout
        walk.ok(fetch)
        walk.ok(seal)
        walk.run(fail)
        out = walk.ok(start, code=1)
        assert "halted" in out, out
        shown = walk.ok(show)
        assert "halted" in shown and "sim-0001" in shown, shown
        doc = json.loads((walk.dir / "plant/rollouts/wake-v4.json").read_text())
        assert doc["state"] == "halted"
        assert doc["waves"][0]["devices"] == ["sim-0000", "sim-0001"]
        view = ".rollout[data-rollout='wake-v4']"
        page.wait_for_selector(f"{view}:has-text('halted'):has-text('rolled back')", timeout=WAIT_MS)
        page.screenshot(path=str(shots / "03-rollout-rolled-back.png"))

    # A signed ping to all: every online device answers, each verified with its pinned key.
    (line,) = ping
    out = walk.ok(line)
    answers = [ln for ln in out.splitlines() if ln.startswith("✓ ")]
    assert len(answers) == 200 and not any("learned key" in a or " ok " not in a for a in answers), out
    assert "✓ real-1  ok" in out and "✗" not in out
    assert out.splitlines()[-1].startswith("200/200 answered ok")

    # Grafana: the exporter has every device.
    serve, scrape = grafana
    walk.run(serve)

    def exported() -> bool:
        got = walk.run(scrape)
        return got is not None and got.stdout.strip() == "201"

    _until(exported, "201 devices exported")
    assert walk.ok(scrape).strip() == "201"

    # Home Assistant: the real device's discovery configs.
    (line,) = ha
    topics = walk.ok(line).split()
    assert len(topics) == 19 and all(t.startswith("homeassistant/") for t in topics)
    assert "homeassistant/binary_sensor/edgeguard_plant_real_1/online/config" in topics
    assert all(p.stat().st_size > 10_000 for p in shots.glob("*.png")) and len(list(shots.glob("*.png"))) == 3
