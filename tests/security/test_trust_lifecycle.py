"""Attacks on the trust and model lifecycle, each run against the real service (supervisor + worker child
processes, a real mosquitto, real sealed bundles on disk): revocation at reload, renamed and rolled-back
bundles, a vanished rollback floor, expiry while serving, a missing bundle file."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgeguard.keys import generate_keypair, load_publisher_key
from tests.service._env import ADMIN, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(p) for p in rec.on_topic("/events")) if e["kind"] == kind]


def _heartbeats(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(p) for p in rec.on_topic("/heartbeat")]


def _wait_event(rec: Recorder, kind: str, check: str | None, after: int = 0) -> dict[str, Any]:
    """The first ``kind`` event (with ``check``) beyond the first ``after`` of that kind."""

    def found() -> list[dict[str, Any]]:
        return [e for e in _events(rec, kind)[after:] if check is None or e.get("check") == check]

    assert rec.wait_for(lambda _m: bool(found()), 30), f"no {kind} event ({check}): {_events(rec, kind)}"
    return found()[0]


def _not_serving(dev: Device, reason: str) -> None:
    """Infer answers 503 naming ``reason``; health is not ok (503), says no-model and why."""
    code, err = dev.request("POST", "/v1/infer", GOOD)
    assert code == 503 and reason in err["error"], (code, err)
    code, health = dev.request("GET", "/v1/health", token=STATUS)
    assert code == 503 and health["ok"] is False, health
    assert health["state"] == "no-model" and health["model"] is None
    assert reason in health["degraded_reason"], health


def _reload(dev: Device, how: str) -> None:
    if how == "api":
        assert dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)[0] == 200
    else:
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGHUP)


def test_revoked_or_untrusted_signer_stops_serving_at_reload(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        revocations = tmp_path / "revoked.txt"
        revocations.write_text("# revoked publisher key ids\n")
        dev.provision(tiny_bundle(tmp_path), model_extra='revocations = "revoked.txt"\n')
        dev.start()
        try:
            dev.wait_ready()
            assert dev.request("POST", "/v1/infer", GOOD)[0] == 200
            # The operator revokes the key that signed the serving bundle; the config paths do not change.
            kid = load_publisher_key(tmp_path / "keys/publisher.key").key_id
            revocations.write_text(f"{kid}  # leaked\n")
            _reload(dev, "api")
            ev = _wait_event(rec, "bundle-rejected", "revoked")
            assert kid in ev["reason"] and ev["reload"] is True
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 503, 10, "revoked model unloaded")
            _not_serving(dev, "revoked")
            assert rec.wait_for(
                lambda _m: any("revoked" in str(h.get("degraded_reason")) for h in _heartbeats(rec)), 10
            )
            # Un-revoked: the same bundle serves again at the next reload.
            revocations.write_text("")
            _reload(dev, "sighup")
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 200, 30, "serving again")
            # The trusted .pub replaced by another publisher's key: the serving bundle's signer is no longer
            # trusted, so it stops serving too.
            generate_keypair("publisher", tmp_path / "other")
            (tmp_path / "keys/publisher.pub").write_bytes((tmp_path / "other/publisher.pub").read_bytes())
            _reload(dev, "sighup")
            _wait_event(rec, "bundle-rejected", "untrusted signer")
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 503, 10, "untrusted model unloaded")
            _not_serving(dev, "not in the trust store")
            assert json.loads((tmp_path / "state/supervisor.json").read_text())["failures"] == 0
        finally:
            assert dev.stop() == 0


def test_renamed_older_bundle_and_vanished_floor_are_refused(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path, version=2))
        dev.start()
        try:
            dev.wait_ready()
            assert dev.request("POST", "/v1/infer", GOOD)[1]["model"] == {"name": "sensor", "version": 2}
            # The attacker re-signs nothing: an older, validly signed bundle under another name (its floor
            # is 0) is put in place of the current one.
            (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=1, scale=5.0, name="sensor-b"))
            _reload(dev, "api")
            ev = _wait_event(rec, "bundle-rejected", "wrong model")
            assert "sensor-b" in ev["reason"] and "model.name" in ev["reason"]
            # Refused before it replaced anything: the pinned model keeps serving.
            code, res = dev.request("POST", "/v1/infer", GOOD)
            assert code == 200 and res["model"] == {"name": "sensor", "version": 2}
        finally:
            assert dev.stop() == 0
        # Offline, the floor file is deleted and the old version put back: a device that has served v2
        # must not read the missing floor as 0.
        (tmp_path / "state/rollback/sensor").unlink()
        (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=1))
        dev.notes.clear()  # READY=1 of the first run must not count as the second one's
        dev.start()
        try:
            dev.wait_ready()
            ev = _wait_event(rec, "bundle-rejected", "rollback")
            assert "vanished" in ev["reason"]
            _not_serving(dev, "vanished")
        finally:
            assert dev.stop() == 0


def test_model_expiring_while_serving_stops_serving(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        not_after = datetime.now(timezone.utc) + timedelta(seconds=12)
        dev.provision(tiny_bundle(tmp_path, not_after=not_after))
        dev.start()
        try:
            dev.wait_ready()
            code, _ = dev.request("POST", "/v1/infer", GOOD)
            assert code == 200 and datetime.now(timezone.utc) < not_after, "started too late to test"
            ev = _wait_event(rec, "bundle-rejected", "expired")
            assert datetime.now(timezone.utc) >= not_after and ev["reload"] is False
            _not_serving(dev, "expired")
            assert rec.wait_for(
                lambda _m: any(
                    h.get("state") == "no-model" and "expired" in str(h.get("degraded_reason"))
                    for h in _heartbeats(rec)
                ),
                10,
            )
            # A reload finds the same bundle expired and does not bring it back.
            _reload(dev, "sighup")
            _wait_event(rec, "bundle-rejected", "expired", after=1)
            _not_serving(dev, "expired")
        finally:
            assert dev.stop() == 0


def test_missing_bundle_is_no_model_then_serves_after_reload(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(b"")  # no model.egm on disk
        dev.start()
        try:
            dev.wait_ready()
            ev = _wait_event(rec, "bundle-rejected", None)
            assert ev["check"] is None and ev["reason"] == f"bundle file not found: {tmp_path / 'model.egm'}"
            _not_serving(dev, "not found")
            log = (tmp_path / "service.log").read_text()
            assert "Traceback" not in log
            assert f"API listening on unix:{tmp_path / 'api.sock'}, http://127.0.0.1:{dev.port}" in log
            (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path))
            _reload(dev, "sighup")
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 200, 30, "serving after reload")
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200 and health["ok"] is True and health["state"] == "serving"
            assert json.loads((tmp_path / "state/supervisor.json").read_text())["failures"] == 0
        finally:
            assert dev.stop() == 0
