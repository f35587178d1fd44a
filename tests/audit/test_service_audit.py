"""The real service (supervisor + worker child processes, a real mosquitto): its security events land in
the audit log, the signed checkpoints it publishes on `events` verify, and `edgeguard audit verify` accepts
the log and names a record someone changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeguard.audit import log_files, parse_line
from tests.service._env import ADMIN, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeguard", "audit", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(p) for p in rec.on_topic("/events")) if e["kind"] == kind]


def test_service_events_are_audited_and_verify(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), extra="\n[audit]\ncheckpoint_records = 3\n")
        dev.start()
        try:
            dev.wait_ready()
            assert dev.request("GET", "/v1/health", token="not-a-token-at-all-0000")[0] == 401
            assert dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)[0] == 200
            assert rec.wait_for(lambda _m: bool(_events(rec, "reloaded")), 30)
            assert rec.wait_for(lambda _m: len(_events(rec, "audit-checkpoint")) >= 2, 30), dev.log_tail()
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200, health
            audit = health["security"]["audit"]
            assert audit["records"] >= 6 and audit["error"] is None and audit["last_checkpoint"], audit
        finally:
            assert dev.stop() == 0
        capture = tmp_path / "events.txt"
        capture.write_text("".join(f"{t} {p.decode()}\n" for t, p in rec.snapshot() if t.endswith("/events")))
    state = tmp_path / "state"
    kinds = [r.kind for f in log_files(state / "audit") for r in map(parse_line, f.read_bytes().splitlines())
             if r is not None]
    for kind in ("service-start", "bundle-accepted", "token-refused", "reloaded", "integrity-baseline",
                 "audit-checkpoint"):
        assert kind in kinds, (kind, kinds)
    pub = str(state / "device-sign.pub")
    ok = _cli("verify", "--state", str(state), "--pub", pub, "--from-mqtt-capture", str(capture))
    assert ok.returncode == 0 and "audit log intact" in ok.stdout, ok.stdout + ok.stderr
    shown = _cli("show", "--state", str(state), "--kind", "token-refused", "--json")
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert shown.returncode == 0 and len(rows) == 1 and rows[0]["data"]["status"] == 401
    assert "not-a-token-at-all" not in "".join(f.read_text() for f in log_files(state / "audit"))

    # Someone edits the refused-token record to hide it: verify names that record and exits 3.
    path = log_files(state / "audit")[0]
    lines = path.read_bytes().splitlines(keepends=True)
    index = next(i for i, ln in enumerate(lines) if b'"kind":"token-refused"' in ln)
    lines[index] = lines[index].replace(b"token-refused", b"token-accepted")
    path.write_bytes(b"".join(lines))
    bad = _cli("verify", "--state", str(state), "--pub", pub)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert f"record {index} (" in bad.stderr and "audit log tampered" in bad.stderr, bad.stderr
    # Cutting the log back to before that record is caught by the checkpoints published on MQTT.
    path.write_bytes(b"".join(lines[:index]))
    (state / "audit" / "checkpoint.json").unlink()
    cut = _cli("verify", "--state", str(state), "--pub", pub, "--from-mqtt-capture", str(capture))
    assert cut.returncode == 3 and "truncated" in cut.stderr, cut.stderr
