"""`edgeguard scan` and `edgeguard doctor` as operators run them, signed advisories, the systemd unit's score,
and the posture inside the real service (heartbeat field, events, time floor)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import edgeguard.cli._scan_cmds as scan_cmds
from edgeguard.cli import main
from edgeguard.clock import FLOOR_FILE
from edgeguard.keys import TrustStore, generate_keypair, load_publisher_key, load_trusted_key
from edgeguard.posture import ADVISORY_FILE, AdvisoryError, read_advisories, sign_advisories
from edgeguard.posture._host import analyze_security, installed_version
from tests.posture._rig import UNIT, Rig
from tests.service._env import STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

NUMPY = installed_version("numpy") or "0"


def _advisory(package: str, affected: list[str], severity: str = "high") -> dict[str, Any]:
    return {
        "id": "EGSA-2026-001",
        "package": package,
        "affected": affected,
        "severity": severity,
        "summary": "heap overflow in a parser",
        "fix": f"upgrade {package}",
    }


def _ship(rig: Rig, advisories: list[dict[str, Any]], *, key: str = "keys/publisher.key") -> Path:
    payload = {"created": "2026-11-29T00:00:00Z", "advisories": advisories}
    path = rig.root / ADVISORY_FILE  # beside model.egm
    path.write_bytes(sign_advisories(payload, load_publisher_key(rig.root / key)))
    return path


def _advisory_findings(rig: Rig) -> list[dict[str, str]]:
    return [f.to_json() for f in rig.scan().findings if f.check == "advisories"]


# --- advisories -------------------------------------------------------------------------------------------


def test_signed_advisory_for_an_installed_version_is_a_finding_and_gone_when_not_affected(rig: Rig) -> None:
    rig.scan()  # writes the keys
    _ship(rig, [_advisory("numpy", [f"<={NUMPY}"], "high"), _advisory("not-installed-pkg", ["<99"])])
    found = _advisory_findings(rig)
    assert [(f["severity"], f["title"].split(" is ")[0]) for f in found] == [("high", f"numpy {NUMPY}")]
    assert "EGSA-2026-001" in found[0]["title"] and found[0]["fix"] == "upgrade numpy"
    _ship(rig, [_advisory("numpy", [f">{NUMPY}"])])  # fixed: the installed version is not affected
    assert _advisory_findings(rig) == []


def test_no_advisory_file_is_only_info(rig: Rig) -> None:
    assert [f["severity"] for f in _advisory_findings(rig)] == ["info"]


@pytest.mark.parametrize("attack", ["tampered", "untrusted", "revoked", "symlink", "not-json"])
def test_an_advisory_file_that_does_not_verify_is_a_high_finding(rig: Rig, attack: str) -> None:
    rig.scan()
    path = _ship(rig, [_advisory("numpy", [f"<={NUMPY}"])])
    if attack == "tampered":
        env = json.loads(path.read_bytes())
        env["payload"] = env["payload"][:-4] + ("AAA=" if not env["payload"].endswith("AAA=") else "BBB=")
        path.write_text(json.dumps(env))
    elif attack == "untrusted":
        generate_keypair("publisher", rig.root / "rogue")
        _ship(rig, [_advisory("numpy", [f"<={NUMPY}"])], key="rogue/publisher.key")
    elif attack == "revoked":
        key_id = json.loads(path.read_bytes())["key_id"]
        (rig.root / "revoked.txt").write_text(key_id + "\n")
        rig.extra = ""
        rig.after.append(_revoke)
    elif attack == "symlink":
        real = rig.root / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    else:
        path.write_text("{")
    found = _advisory_findings(rig)
    assert [f["severity"] for f in found] == ["high"], found
    assert "not trustworthy" in found[0]["title"]


def _revoke(rig: Rig) -> None:
    cfg = rig.root / "edgeguard.toml"
    text = cfg.read_text().replace(
        'trust = ["keys/publisher.pub"]', 'trust = ["keys/publisher.pub"]\nrevocations = "revoked.txt"'
    )
    cfg.write_text(text)


def test_read_advisories_refuses_a_bundle_signature_domain(tmp_path: Path) -> None:
    generate_keypair("publisher", tmp_path)
    key = load_publisher_key(tmp_path / "publisher.key")
    trust = TrustStore([load_trusted_key(tmp_path / "publisher.pub")])
    good = sign_advisories({"advisories": [_advisory("numpy", ["<1"])]}, key)
    (tmp_path / "a.json").write_bytes(good)
    assert read_advisories(tmp_path / "a.json", trust)[0].package == "numpy"
    env = json.loads(good)
    import base64

    body = base64.b64decode(env["payload"])
    env["signature"] = base64.b64encode(key.private_key.sign(body)).decode()  # no domain prefix
    (tmp_path / "a.json").write_text(json.dumps(env))
    with pytest.raises(AdvisoryError, match="does not verify"):
        read_advisories(tmp_path / "a.json", trust)
    with pytest.raises(AdvisoryError, match="affected"):
        sign_advisories({"advisories": [_advisory("numpy", ["~=1"])]}, key)


def test_advisories_sign_cli_round_trip_and_bad_payload_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_keypair("publisher", tmp_path)
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"advisories": [_advisory("numpy", ["<1"])]}))
    out = tmp_path / ADVISORY_FILE
    assert (
        main(
            [
                "advisories",
                "sign",
                str(payload),
                "--sign-key",
                str(tmp_path / "publisher.key"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    trust = TrustStore([load_trusted_key(tmp_path / "publisher.pub")])
    assert read_advisories(out, trust)[0].affected == ("<1",)
    payload.write_text(json.dumps({"advisories": [{"package": "numpy"}]}))
    capsys.readouterr()
    assert (
        main(
            [
                "advisories",
                "sign",
                str(payload),
                "--sign-key",
                str(tmp_path / "publisher.key"),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1


# --- the unit's sandboxing (the real systemd-analyze, offline on the unit file) -------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_shipped_unit_scores_well_and_a_stripped_one_is_a_finding(rig: Rig) -> None:
    score = analyze_security(UNIT)
    assert score is not None and score < 5.0, score
    rig.probe = replace(rig.probe, security_score=analyze_security)
    assert not [f for f in rig.scan().findings if f.check == "systemd"]
    keep = ("[", "Description", "Type", "ExecStart", "User", "Group", "WatchdogSec", "LimitCORE", "#")
    stripped = [line for line in UNIT.read_text().splitlines() if not line or line.startswith(keep)]
    (rig.root / "bare.service").write_text("\n".join(stripped) + "\n")
    rig.probe = replace(rig.probe, unit=lambda: rig.root / "bare.service")
    found = [f for f in rig.scan().findings if f.check == "systemd"]
    assert [f.severity for f in found] in (["medium"], ["high"]), found
    assert "exposure" in found[0].evidence


def test_unit_forbids_core_dumps_and_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "\nLimitCORE=0\n" in text and "\nLimitMEMLOCK=" in text
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).with_name("edgeguard")
    (tmp_path / "edgeguard.service").write_text(text.replace("/opt/edgeguard/venv/bin/edgeguard", str(exe)))
    p = subprocess.run(
        [tool, "verify", str(tmp_path / "edgeguard.service")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0 and "edgeguard.service" not in p.stderr, p.stderr


# --- the CLI -------------------------------------------------------------------------------------------


def test_scan_cli_json_table_and_exit_statuses(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.scan()
    cfg = str(rig.root / "edgeguard.toml")
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line, for the assertions
    monkeypatch.setattr(scan_cmds, "run_scan", partial(scan_cmds.run_scan, host=rig.probe))
    assert main(["scan", "-c", cfg, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["worst"] == "low" and "broker" in doc["checks"]
    assert {f["check"] for f in doc["findings"]} >= {"broker-tls", "broker-anonymous"}
    (rig.root / "keys" / "device.key").chmod(0o644)
    assert main(["scan", "-c", cfg]) == 1
    out = capsys.readouterr().out
    assert "device key is readable" in out and "chmod 600" in out and "exit 1" in out
    assert main(["scan", "-c", str(rig.root / "missing.toml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_scan_cli_on_this_real_host_runs_every_check(rig: Rig) -> None:
    """No seams: the real /proc, clock and tools. Whatever this host's posture, the report is complete."""
    rig.scan()
    p = subprocess.run(
        [sys.executable, "-m", "edgeguard", "scan", "-c", str(rig.root / "edgeguard.toml"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    doc = json.loads(p.stdout)
    assert p.returncode == (0 if doc["ok"] else 1), p.stderr
    assert len(doc["checks"]) == 10
    assert all(f["severity"] in ("info", "low", "medium", "high", "critical") for f in doc["findings"])


def _memlock_zero_without_ipc_lock() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def test_doctor_reports_unencrypted_swap_and_a_buffer_it_could_not_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "swaps").write_text("Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n")
    assert main(["doctor", "--root", str(tmp_path), "--profile", "generic-x86_64", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["swap_unencrypted"] is True and mem["swap"] == [{"device": "/dev/sda2", "kind": "plain"}]
    (tmp_path / "proc" / "swaps").write_text(
        "Filename Type Size Used Priority\n/dev/zram0 partition 1 0 -2\n"
    )
    assert main(["doctor", "--root", str(tmp_path), "--profile", "generic-x86_64"]) == 0
    out = capsys.readouterr().out
    assert "swap on /dev/zram0 (zram)" in out and "unencrypted" not in out
    # With a bundle, in a process that may lock nothing (RLIMIT_MEMLOCK 0, and no CAP_IPC_LOCK to ignore it):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop CAP_IPC_LOCK")
    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path))
    drop = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"] if os.geteuid() == 0 else []
    p = subprocess.run(
        [
            *drop,
            sys.executable,
            "-m",
            "edgeguard",
            "doctor",
            "--profile",
            "generic-x86_64",
            "--json",
            "--bundle",
            str(tmp_path / "model.egm"),
            "--trust",
            str(tmp_path / "keys/publisher.pub"),
            "--device-key",
            str(tmp_path / "keys/device.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=_memlock_zero_without_ipc_lock,
    )
    assert p.returncode == 0, p.stderr
    mem = json.loads(p.stdout)["memory"]
    assert mem["memlock_limit"] == 0 and "not locked in RAM (RLIMIT_MEMLOCK is 0.0 MiB)" in mem["mlock"]


# --- inside the real service ---------------------------------------------------------------------------


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    out = []
    for payload in rec.on_topic("/events"):
        doc = json.loads(payload)
        if doc.get("kind") == kind:
            out.append(doc)
    return out


def test_service_reports_posture_in_health_heartbeat_and_events(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start()
        try:
            dev.wait_ready()
            code, doc = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200
            posture = doc["posture"]
            assert posture["memory"]["dumpable"] is False and posture["memory"]["core_limit"] == 0
            assert posture["clock"]["floor_source"] == "bundle sensor v1"
            assert rec.wait_for(lambda m: _events(rec, "posture-scan"), 30)
            summary = _events(rec, "posture-scan")[0]
            assert set(summary["counts"]) == {"info", "low", "medium", "high", "critical"}
            findings = _events(rec, "posture-finding")
            assert any(f["check"] == "broker-tls" and f["severity"] == "low" for f in findings)
            beats = [json.loads(p) for p in rec.on_topic("/heartbeat")]
            assert rec.wait_for(
                lambda m: any(
                    (json.loads(p).get("posture") or {}).get("scan") for p in rec.on_topic("/heartbeat")
                ),
                30,
            ), beats[-1:] if beats else "no heartbeat"
        finally:
            assert dev.stop() == 0
    floor = json.loads((tmp_path / "state" / FLOOR_FILE).read_text())
    assert floor["source"] in ("bundle sensor v1", "checkpoint", "shutdown")


_CLI_THEN_STATE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
from edgeguard._hardening import process_hardening
from edgeguard.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, **process_hardening().to_json()}))
"""


@pytest.mark.parametrize("command", ["infer", "verify", "doctor"])
def test_cli_commands_that_hold_plaintext_harden_their_process(tmp_path: Path, command: str) -> None:
    import numpy as np

    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path))
    np.save(tmp_path / "x.npy", np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    keys = [
        "--trust",
        str(tmp_path / "keys/publisher.pub"),
        "--device-key",
        str(tmp_path / "keys/device.key"),
    ]
    bundle = str(tmp_path / "model.egm")
    argv = {
        "infer": [
            "infer",
            "--bundle",
            bundle,
            *keys,
            "--profile",
            "generic-x86_64",
            "--json",
            str(tmp_path / "x.npy"),
        ],
        "verify": ["verify", bundle, *keys],
        "doctor": ["doctor", "--profile", "generic-x86_64", "--json", "--bundle", bundle, *keys],
    }[command]
    p = subprocess.run(
        [sys.executable, "-c", _CLI_THEN_STATE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    state = json.loads(p.stdout.strip().splitlines()[-1])
    assert state["rc"] == 0, p.stderr
    assert state["dumpable"] is False and state["core_limit"] == 0
