"""`edgeguard fleet rollout` / `fleet deploy` against 20 simulated devices (tools/fleet_sim.py: signed
commands checked by the device's gatekeeper, signed answers, deploys with probation) on a real mosquitto.
The operator runs as a real child process; the devices come from a real fleet directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fleet._rollout import (
    DEVICES,
    Fleet20,
    deploys,
    make_fleet20,
    make_tls_fleet20,
    operator,
    run,
    sim,
    state,
    wait_state,
)
from tests.fleet._sim import ROOT, SimFleet
from tests.support.broker import MosquittoBroker, Recorder


@pytest.fixture
def fleet20(tmp_path: Path, okay_nabu_path: Path) -> Fleet20:
    return make_fleet20(tmp_path, okay_nabu_path)


def _rollout(fleet: Fleet20, broker: MosquittoBroker, rid: str, *extra: str) -> list[str]:
    return [*operator(fleet, broker, "rollout", str(fleet.bundle), "--to", "line-1", "--id", rid), *extra]


def test_three_waves_over_20_devices_all_pass(fleet20: Fleet20, mosquitto: MosquittoBroker) -> None:
    with sim(mosquitto, fleet20) as s, Recorder(mosquitto, "edgeguard/v1/plant/rollouts/#") as rec:
        started = time.monotonic()
        out = run(_rollout(fleet20, mosquitto, "r1", "--canary", "5%", "--then", "25%,100%",
                           "--max-failures", "2", "--probation", "2"))
        took = time.monotonic() - started
        assert out.returncode == 0, out.stdout + out.stderr
        assert deploys(s) == {d: 1 for d in DEVICES}  # each device exactly one signed deploy
        assert rec.wait_for(lambda m: any(json.loads(p)["state"] == "done" for _, p in m if p))
        published = [json.loads(p) for _, p in rec.snapshot() if p]
    print(f"\nrollout of 20 simulated devices, 3 waves, probation 2 s: {took:.1f} s")
    doc = state(fleet20, "r1")
    assert doc["state"] == "done" and doc["failures"] == 0
    assert [len(w["devices"]) for w in doc["waves"]] == [1, 4, 15]
    assert [w["devices"] for w in doc["waves"]] == [DEVICES[:1], DEVICES[1:5], DEVICES[5:]]  # id order
    assert all(w["state"] == "passed" and sorted(w["ok"]) == w["devices"] for w in doc["waves"])
    # piped: the plan and the summary, no live table
    assert out.stdout.splitlines() == [
        "rollout r1: wake v4 to line-1, 3 waves of 1, 4, 15 devices",
        "rollout r1: done; waves passed 3/3; devices ok 20/20; failures 0 (max 2)",
    ]
    # progress on the contract topic: waves passed one after another, never two deploying at once
    for p in published:
        assert set(p) >= {"v", "id", "model", "version", "sha256", "group", "state", "waves", "failures"}
        active = [w for w in p["waves"] if w["state"] in ("deploying", "probation")]
        assert len(active) <= 1
    assert published[-1]["model"] == "wake" and published[-1]["version"] == 4


def test_canary_failure_halts_rolls_back_and_later_waves_never_get_it(
    fleet20: Fleet20, mosquitto: MosquittoBroker
) -> None:
    with sim(mosquitto, fleet20) as s, Recorder(mosquitto, "edgeguard/v1/plant/bundles/#") as bundles:
        s.send("fail-probation dev-00 error rate 0.4 > 0.05")
        s.send("fail-probation dev-01 worker crashed")
        # canary 15% = dev-00..02; two fail (> --max-failures 1) while dev-02 is healthy in probation
        out = run(_rollout(fleet20, mosquitto, "bad", "--canary", "15%", "--then", "50%,100%",
                           "--max-failures", "1", "--probation", "120"))
        assert out.returncode == 1, out.stdout + out.stderr
        got = deploys(s)
        # the bundle was published, then removed (empty retained payloads) when the rollout ended
        assert bundles.wait_for(lambda m: any(t.endswith("/meta") and not p for t, p in m))
    assert got == {"dev-00": 1, "dev-01": 1, "dev-02": 1}  # waves 1 and 2 never received the deploy
    doc = state(fleet20, "bad")
    assert doc["state"] == "halted" and doc["failures"] == 2
    assert "exceed --max-failures 1" in doc["reason"]
    canary = doc["waves"][0]
    assert canary["state"] == "failed"
    assert canary["failed"]["dev-00"] == "rolled-back: error rate 0.4 > 0.05"
    assert canary["failed"]["dev-01"] == "rolled-back: worker crashed"
    # dev-02 took the new version and was sent `rollback` (its signed answer says rolled-back)
    assert sorted(canary["rolled_back"]) == ["dev-00", "dev-01", "dev-02"]
    assert [w["state"] for w in doc["waves"][1:]] == ["pending", "pending"]
    assert "halted" in out.stdout and "rolled back: " in out.stdout


def test_resume_after_the_operator_is_killed_mid_wave(fleet20: Fleet20, mosquitto: MosquittoBroker) -> None:
    with sim(mosquitto, fleet20) as s:
        proc = subprocess.Popen(
            _rollout(fleet20, mosquitto, "r2", "--canary", "5%", "--then", "25%,100%", "--probation", "3"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            wait_state(fleet20, "r2", lambda d: d["waves"][1]["state"] in ("deploying", "probation"), 120)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        killed = state(fleet20, "r2")
        assert killed["state"] == "running" and killed["waves"][0]["state"] == "passed"
        out = run(operator(fleet20, mosquitto, "rollout", "--resume", "r2"))
        assert out.returncode == 0, out.stdout + out.stderr
        # no device got the deploy twice: those that had it were followed, not asked again
        assert deploys(s) == {d: 1 for d in DEVICES}
    doc = state(fleet20, "r2")
    assert doc["state"] == "done"
    assert sorted(d for w in doc["waves"] for d in w["ok"]) == DEVICES
    again = run(operator(fleet20, mosquitto, "rollout", "--resume", "r2"))
    assert again.returncode == 2
    assert again.stderr == "edgeguard: rollout r2 is done: nothing to resume\n"


def test_abort_stops_the_running_rollout_and_rolls_back_the_canary(
    fleet20: Fleet20, mosquitto: MosquittoBroker
) -> None:
    with sim(mosquitto, fleet20) as s:
        proc = subprocess.Popen(
            _rollout(fleet20, mosquitto, "r3", "--canary", "10%", "--probation", "300"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            wait_state(fleet20, "r3", lambda d: d["waves"][0]["state"] == "probation", 120)
            out = run([*operator(fleet20, mosquitto, "rollout", "abort", "r3")])
            assert out.returncode == 0, out.stdout + out.stderr
            stdout, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 1
        assert deploys(s) == {"dev-00": 1, "dev-01": 1}
    doc = state(fleet20, "r3")
    assert doc["state"] == "aborted" and doc["reason"] == "aborted by the operator"
    assert sorted(doc["waves"][0]["rolled_back"]) == ["dev-00", "dev-01"]
    assert "aborted" in stdout
    assert not (fleet20.root / "rollouts" / "r3.abort").exists()


def test_deploy_one_shot_shows_verified_answers_and_refusals(
    fleet20: Fleet20, mosquitto: MosquittoBroker
) -> None:
    with sim(mosquitto, fleet20) as s:
        s.send("refuse-deploy dev-03 self-test")
        good = run(operator(fleet20, mosquitto, "deploy", str(fleet20.bundle), "--to", "dev-02",
                            "--probation", "30"))
        bad = run(operator(fleet20, mosquitto, "deploy", str(fleet20.bundle), "--to", "dev-03"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("✓ dev-02  probation  detector v4 slot b until ")
    sha = _sha(fleet20.bundle)
    assert good.stdout.strip().endswith(f"1/1 devices took wake v4 (sha256 {sha[:16]}…)")
    assert bad.returncode == 1
    assert "✗ dev-03  refused: self-test: simulated refusal" in bad.stdout


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "nope"], "--to 'nope': no device and no group of that name in the inventory"),
        (["--to", "line-1", "--canary", "25%", "--then", "10%,100%"],
         "wave percentages must increase: 25% then 10%"),
        (["--to", "line-1", "--canary", "0%"], "wave size '0%': a whole percentage 1..100 (e.g. 5%)"),
        (["--to", "line-1", "--max-failures", "-1"], "--max-failures: 0 or more"),
    ],
)
def test_bad_rollout_inputs_are_one_line_errors(fleet20: Fleet20, args: list[str], message: str) -> None:
    out = run(_local(fleet20, "rollout", str(fleet20.bundle), *args))
    assert out.returncode == 2 and out.stderr == f"edgeguard: {message}\n" and out.stdout == ""
    assert not (fleet20.root / "rollouts").exists() or not list((fleet20.root / "rollouts").glob("*.json"))


def test_missing_model_file_is_a_one_line_error(fleet20: Fleet20, tmp_path: Path) -> None:
    missing = tmp_path / "nope.egm"
    for cmd in (["rollout", str(missing), "--to", "line-1"], ["deploy", str(missing), "--to", "dev-01"]):
        out = run(_local(fleet20, *cmd))
        assert out.returncode == 2 and out.stderr == f"edgeguard: {missing}: no such bundle file\n"
    for cmd, msg in (
        (["rollout", "--resume", "nope"], f"no rollout 'nope' in {fleet20.root / 'rollouts'}"),
        (["rollout", "abort", "nope"], f"no rollout 'nope' in {fleet20.root / 'rollouts'}"),
        (["rollout", "status", "../x"], "rollout id '../x': 1..64 of [A-Za-z0-9_.-]"),
    ):
        out = run(_local(fleet20, *cmd))
        assert out.returncode == 2 and out.stderr == f"edgeguard: {msg}\n", out.stderr


def _local(fleet: Fleet20, sub: str, *args: str) -> list[str]:
    """An operator command that fails before it needs the broker."""
    return [sys.executable, "-m", "edgeguard", "fleet", sub, "-f", str(fleet.root), *args]


def test_simulated_devices_answer_signed_and_refuse_commands_not_signed_by_the_operator(
    fleet20: Fleet20, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rogue = tmp_path / "rogue.key"
    rogue.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    rogue.chmod(0o600)
    broker = ["--fleet", "plant", "--broker", f"{mosquitto.host}:{mosquitto.port}", "--protocol", "3.1.1",
              "--device-keys", str(fleet20.root / "devices")]
    with sim(mosquitto, fleet20):
        good = run([sys.executable, "-m", "edgeguard", "fleet", "send", "ping", "--to", "dev-07",
                    "--sign-key", str(fleet20.root / "keys/operator.key"), *broker])
        bad = run([sys.executable, "-m", "edgeguard", "fleet", "send", "ping", "--to", "dev-07",
                   "--sign-key", str(rogue), *broker])
    assert good.returncode == 0 and good.stdout.startswith('✓ dev-07  ok  {"pong": true}'), good.stdout
    assert bad.returncode == 1
    assert bad.stdout.startswith("✓ dev-07  refused: untrusted signer: operator key "), bad.stdout


def test_the_live_table_shows_each_wave() -> None:
    from rich.console import Console

    from edgeguard.cli._fleet_rollout_show import table
    from edgeguard.fleet.rollout import Rollout, Settings, Wave

    r = Rollout(id="r9", model="wake", version=4, sha256="0" * 64, size=1, bundle="/b", group="line-1",
                max_failures=2, settings=Settings(), started=0.0,
                waves=[Wave(0, 5, ["a"], "passed", ok=["a"]),
                       Wave(1, 100, ["b", "c"], "probation", time.time() + 100,
                            failed={"c": "refused: digest"})],
                failures=1)
    console = Console(record=True, width=140)
    console.print(table(r))
    text = console.export_text()
    assert "rollout r9  wake v4 → line-1  running  failures 1/2" in text
    assert "passed" in text and "probation" in text and "c: refused: digest" in text


def test_rollout_through_the_fleets_own_broker_with_mutual_tls_and_its_acl(
    tmp_path: Path, okay_nabu_path: Path
) -> None:
    """The generated mosquitto configuration: the operator (`--operator ops`, its client certificate) may
    publish the bundle and the progress, each device reads the bundle and only its own commands."""
    fleet, broker = make_tls_fleet20(tmp_path, okay_nabu_path)
    try:
        s = SimFleet(broker, 20, "--fleet-dir", str(fleet.root), "--tls", "--heartbeat", "1",
                     "--results-every", "0")
        with s:
            s.expect("ready 20", timeout=60)
            out = run([sys.executable, "-m", "edgeguard", "fleet", "rollout", "-f", str(fleet.root),
                       str(fleet.bundle), "--to", "line-1", "--id", "tls", "--probation", "2",
                       "--operator", "ops"])
            assert out.returncode == 0, out.stdout + out.stderr + broker.log_tail()
            assert deploys(s) == {d: 1 for d in DEVICES}
    finally:
        broker.kill()
    doc = state(fleet, "tls")
    assert doc["state"] == "done" and sorted(d for w in doc["waves"] for d in w["ok"]) == DEVICES


def test_on_a_terminal_the_rollout_is_shown_live(fleet20: Fleet20, mosquitto: MosquittoBroker) -> None:
    import pty

    with sim(mosquitto, fleet20, count=2):
        primary, secondary = pty.openpty()
        argv = _rollout(fleet20, mosquitto, "tty", "--probation", "2")
        argv[argv.index("line-1")] = "dev-01"
        proc = subprocess.Popen(argv, stdout=secondary, stderr=subprocess.PIPE, cwd=ROOT)
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
        os.close(primary)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))  # no colours
    # the table is redrawn as the rollout goes: frames while it runs, the last one done
    assert text.count("rollout tty  wake v4 → dev-01") >= 2, text
    assert "→ dev-01  running" in text
    assert "→ dev-01  done" in text
    assert "rollout tty: done; waves passed 1/1; devices ok 1/1" in text
