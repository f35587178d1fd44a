"""docs/fleet.md "Rolling out a model", run as written against a private mosquitto and 20 simulated devices
(tools/fleet_sim.py on the fleet directory). Changed only: `--operator ops` (mutual TLS with the fleet's
broker) becomes `--broker` of the test broker, and the probation is 2 s instead of 300."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fleet._fleet import ok
from tests.fleet._sim import ROOT, SimFleet
from tests.support.broker import MosquittoBroker

DOC = ROOT / "docs" / "fleet.md"


def _blocks() -> list[list[str]]:
    text = DOC.read_text().split("## Rolling out a model")[1].split("\n## ")[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [[ln.strip() for ln in b.splitlines() if ln.strip()] for b in blocks]


def _argv(line: str, broker: MosquittoBroker) -> list[str]:
    line = line.replace("--operator ops", f"--broker {broker.host}:{broker.port}")
    line = line.replace("--probation 300", "--probation 2")
    words = shlex.split(line)
    assert words[0] == "edgeguard", line
    return [sys.executable, "-m", "edgeguard", *words[1:]]


def test_rolling_out_a_model_runs_as_written(
    tmp_path: Path, mosquitto: MosquittoBroker, okay_nabu_path: Path
) -> None:
    walk, later, sim_block = _blocks()
    shutil.copy(okay_nabu_path, tmp_path / "wake.tflite")
    fleet = tmp_path / "plant-a"
    ok("fleet", "init", fleet, "--broker", "127.0.0.1:8883", "--group", "line-1")
    ok("fleet", "add-device", "-f", fleet, *[f"cam-{i:02d}" for i in range(1, 21)], "--group", "line-1")
    sim_line = shlex.split(sim_block[0])
    assert sim_line[:3] == ["python", "tools/fleet_sim.py", "20"] and "--fleet-dir" in sim_line
    with SimFleet(mosquitto, 20, "--fleet-dir", str(fleet), "--heartbeat", "1") as sim:
        sim.expect("ready 20", timeout=60)
        outs = []
        for line in walk:
            out = subprocess.run(_argv(line, mosquitto), capture_output=True, text=True, timeout=300,
                                 cwd=tmp_path)
            assert out.returncode == 0, f"{line}\n{out.stdout}{out.stderr}"
            outs.append(out.stdout)
    assert "rollout wake-v4: done; waves passed 3/3; devices ok 20/20" in outs[1]
    assert "wave 0 (5%, 1 devices) passed" in outs[2]
    assert "1/1 devices took wake v4" in outs[3]
    doc = json.loads((fleet / "rollouts/wake-v4.json").read_text())
    assert [len(w["devices"]) for w in doc["waves"]] == [1, 4, 15]
    assert doc["waves"][0]["devices"] == ["cam-01"]
    # the second block's commands, on the finished rollout: each reaches its check and says why not
    expected = ["rollout wake-v4 is done: nothing to resume", "rollout wake-v4 is done already"]
    for line, message in zip(later, expected, strict=True):
        out = subprocess.run(_argv(line, mosquitto), capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr == f"edgeguard: {message}\n", (line, out.stderr)
