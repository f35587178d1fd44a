"""Helpers for the rollout tests: a provisioned fleet of 20 devices with a sealed bundle, the simulator on
it, the operator CLI as a child process, rollout state read back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fleet._fleet import make_fleet, ok
from tests.fleet._sim import ROOT, SimFleet
from tests.support.broker import MosquittoBroker

DEVICES = [f"dev-{i:02d}" for i in range(20)]


@dataclass(frozen=True)
class Fleet20:
    root: Path
    bundle: Path


def make_fleet20(tmp: Path, model: Path) -> Fleet20:
    root = tmp / "fleet"
    make_fleet(root, groups=("line-1",))
    ok("fleet", "add-device", "-f", root, *DEVICES, "--group", "line-1")
    ok("fleet", "seal", "-f", root, model, "--name", "wake", "--version", "4", "--to", "line-1")
    return Fleet20(root, root / "bundles" / "wake-v4.egm")


def sim(broker: MosquittoBroker, fleet: Fleet20, count: int = 20) -> SimFleet:
    s = SimFleet(broker, count, "--fleet-dir", str(fleet.root), "--heartbeat", "1", "--results-every", "0")
    s.expect(f"ready {count}", timeout=60)
    return s


def operator(fleet: Fleet20, broker: MosquittoBroker, *args: str) -> list[str]:
    """argv of an operator command against this fleet and broker."""
    return [sys.executable, "-m", "edgeguard", "fleet", *args, "-f", str(fleet.root),
            "--broker", f"{broker.host}:{broker.port}"]


def run(argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def state(fleet: Fleet20, rollout_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((fleet.root / "rollouts" / f"{rollout_id}.json").read_text())
    return doc


def wait_state(fleet: Fleet20, rollout_id: str, cond: Any, timeout: float) -> dict[str, Any]:
    """The rollout's state file once ``cond(doc)`` holds (another process writes it: polled)."""
    deadline = time.monotonic() + timeout
    path = fleet.root / "rollouts" / f"{rollout_id}.json"
    while True:
        if path.exists():
            doc = state(fleet, rollout_id)
            if cond(doc):
                return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout {rollout_id} never reached the expected state in {timeout} s")
        time.sleep(0.1)


def deploys(s: SimFleet) -> dict[str, int]:
    """Deploy commands each simulated device received (signature checked by the device's gate)."""
    s.send("deploys")
    line = s.expect("deploys")
    return {k: int(v) for k, _, v in (w.partition("=") for w in line.split()[1:])}


class FleetBroker(MosquittoBroker):
    """mosquitto running the configuration `fleet broker-config` generated (TLS, client certificates, ACL)."""

    def __init__(self, directory: Path, conf: Path, port: int) -> None:
        self.generated = conf
        super().__init__(directory, port=port, start=False)

    def _config(self, users: Any) -> str:
        return self.generated.read_text()


def make_tls_fleet20(
    tmp: Path, model: Path, operators: tuple[str, ...] = ("ops",)
) -> tuple[Fleet20, FleetBroker]:
    """The fleet of :func:`make_fleet20` with operators (``ops``) behind its own generated mosquitto. One
    operator identity is one MQTT session (the broker takes the certificate's CN as the client id): a test
    that watches while ``ops`` rolls out needs a second operator."""
    from tests.support.broker import free_port

    port = free_port()
    root = tmp / "fleet"
    make_fleet(root, broker_port=port, groups=("line-1",))
    ok("fleet", "add-device", "-f", root, *DEVICES, "--group", "line-1")
    for name in operators:
        ok("fleet", "add-operator", "-f", root, name)
    ok("fleet", "seal", "-f", root, model, "--name", "wake", "--version", "4", "--to", "line-1")
    ok("fleet", "broker-config", "-f", root, "-o", tmp / "broker", "--user", "root", "--bind", "127.0.0.1")
    broker = FleetBroker(tmp, tmp / "broker/mosquitto.conf", port)
    broker.start()
    return Fleet20(root, root / "bundles" / "wake-v4.egm"), broker
