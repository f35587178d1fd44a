"""Deploy end to end on real components: mosquitto, the real `edgeguard run` service (supervisor + worker),
the zoo's BlazeFace sealed with the repo's packer, signed commands from the operator-side sender."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeguard import zoo
from edgeguard.bundle import RollbackFloor
from edgeguard.fleet.commands import CommandSender
from tests.commands._support import deliver, sign
from tests.deploy._support import (
    blazeface_bundle,
    deploy_args,
    deploy_device,
    deploy_state,
    infer,
    online_sender,
    publish_chunks,
    send_deploy,
    serving_version,
)
from tests.service._env import Device
from tests.support.broker import MosquittoBroker, Recorder, broker_factory, mosquitto  # noqa: F401
from tests.support.slowdown import scaled

pytestmark = pytest.mark.timeout(600)


Running = tuple[Device, Any, CommandSender]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start the device service (``env``: its environment, e.g. a fault) on ``broker``; stopped after."""
    started: list[tuple[Device, CommandSender]] = []

    def run(broker: MosquittoBroker, env: dict[str, str] | None = None) -> Running:
        dev, ops = deploy_device(tmp_path, broker)
        dev.start(env=env, start_new_session=True)
        dev.wait_ready()
        dev.wait(lambda: (tmp_path / "state/device-sign.pub").exists(), 60, "answer key")
        s = online_sender(broker, dev)
        started.append((dev, s))
        return dev, ops, s

    yield run
    for dev, s in started:
        s.close()
        dev.stop()


@pytest.fixture
def running(start: Callable[..., Running], mosquitto: MosquittoBroker) -> Running:  # noqa: F811
    return start(mosquitto)


def _events(rec: Recorder, kind: str) -> list[dict[str, object]]:
    out = []
    for payload in rec.on_topic("dev-1/events"):
        doc = json.loads(payload)
        if doc.get("kind") == kind:
            out.append(doc)
    return out


def _no_plaintext(root: Path) -> None:
    """The model's bytes appear in no file under the device's directory (slots hold sealed bundles only)."""
    needle = zoo.fetch("blazeface").read_bytes()[4096:4160]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert needle not in path.read_bytes(), f"plaintext model bytes in {path}"


def test_deploy_over_mqtt_goes_through_probation_to_committed(
    running: Running, mosquitto: MosquittoBroker, tmp_path: Path  # noqa: F811
) -> None:
    dev, ops, s = running
    assert serving_version(dev) == 1 and deploy_state(dev)["state"] == "idle"
    v2 = blazeface_bundle(tmp_path, 2)
    with Recorder(mosquitto, "edgeguard/v1/test/dev-1/#") as rec:
        publish_chunks(mosquitto, v2)
        d = send_deploy(s, ops, deploy_args(v2, probation_s=3, rollout="r-1"))  # type: ignore[arg-type]
        assert d.answer is not None and d.answer.ok, d.answer.doc
        result = d.answer.doc["result"]
        assert result["state"] == "probation" and result["version"] == 2 and result["slot"] == "a"
        assert result["model"] == "blazeface" and result["rollout"] == "r-1"
        assert serving_version(dev) == 2
        # Floor not moved before the commit.
        assert RollbackFloor(tmp_path / "state").get("blazeface") == 1
        assert infer(dev)[0] == 200
        dev.wait(lambda: deploy_state(dev)["state"] == "committed", scaled(60), "commit")
        assert RollbackFloor(tmp_path / "state").get("blazeface") == 2
        st = deploy_state(dev)
        assert st["version"] == 2 and st["rollout"] == "r-1" and st["probation_until"] is None
        rec.wait_for(lambda m: any(b'"deploy-committed"' in p for _t, p in m))
        kinds = [json.loads(p)["kind"] for p in rec.on_topic("dev-1/events")]
        for k in ("deploy-started", "deploy-probation", "deploy-committed"):
            assert k in kinds
        rec.wait_for(lambda m: any(json.loads(p).get("deploy", {}).get("state") == "committed"
                                   for t, p in m if t.endswith("/heartbeat")))
    record = json.loads((tmp_path / "state/slots/record.json").read_text())
    assert record["active"] == "a" and record["previous"] == "config" and record["state"] == "committed"
    _no_plaintext(tmp_path)
    # The audit log recorded the deploy events.
    audit = b"".join(p.read_bytes() for p in (tmp_path / "state/audit").rglob("*") if p.is_file())
    assert b"deploy-committed" in audit


def test_deploy_from_path_and_the_older_version_refused(
    running: Running, tmp_path: Path
) -> None:
    dev, ops, s = running
    v3 = blazeface_bundle(tmp_path, 3)
    (tmp_path / "v3.egm").write_bytes(v3)
    d = send_deploy(s, ops, deploy_args(v3, source=f"path:{tmp_path / 'v3.egm'}", probation_s=0))  # type: ignore[arg-type]
    assert d.answer is not None and d.answer.ok, d.answer.doc
    dev.wait(lambda: deploy_state(dev)["state"] == "committed", scaled(60), "commit")
    assert serving_version(dev) == 3
    v2 = blazeface_bundle(tmp_path, 2)
    (tmp_path / "v2.egm").write_bytes(v2)
    d = send_deploy(s, ops, deploy_args(v2, source=f"path:{tmp_path / 'v2.egm'}"))  # type: ignore[arg-type]
    assert d.answer is not None and not d.answer.ok
    assert d.answer.doc["check"] == "rollback", d.answer.doc
    assert serving_version(dev) == 3  # kept serving


def test_tampered_bundle_is_refused_and_the_model_keeps_serving(running: Running, mosquitto: MosquittoBroker,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    dev, ops, s = running
    v2 = bytearray(blazeface_bundle(tmp_path, 2))
    signed_digest = deploy_args(bytes(v2))
    v2[len(v2) // 2] ^= 0x01  # one bit of the ciphertext
    tampered = bytes(v2)
    with Recorder(mosquitto, "edgeguard/v1/test/dev-1/events") as rec:
        # (a) chunks replaced on the way: the whole file's SHA-256 is not the signed one
        publish_chunks(mosquitto, tampered, as_sha256=signed_digest["sha256"])
        d = send_deploy(s, ops, signed_digest)
        assert d.answer is not None and not d.answer.ok
        assert d.answer.doc["check"] == "digest", d.answer.doc
        # (b) the tampered file named by its own digest: the bundle's own checks refuse it
        publish_chunks(mosquitto, tampered)
        d = send_deploy(s, ops, deploy_args(tampered))
        assert d.answer is not None and not d.answer.ok
        assert d.answer.doc["check"] in ("integrity", "signature"), d.answer.doc
        rec.wait_for(lambda m: sum(b'"deploy-refused"' in p for _t, p in m) >= 2)
    assert serving_version(dev) == 1 and infer(dev)[0] == 200
    assert not list((tmp_path / "state/deploy").glob("partial-*"))  # nothing of it kept
    assert not (tmp_path / "state/slots/a/bundle.egm").exists()


def test_model_that_crashes_the_worker_on_probation_rolls_back_and_is_refused(
    start: Callable[..., Running], mosquitto: MosquittoBroker, tmp_path: Path  # noqa: F811
) -> None:
    dev, ops, s = start(mosquitto, env={"EDGEGUARD_FAULT": "crash-on-version:2"})
    v2 = blazeface_bundle(tmp_path, 2)
    with Recorder(mosquitto, "edgeguard/v1/test/dev-1/events") as rec:
        publish_chunks(mosquitto, v2)
        d = send_deploy(s, ops, deploy_args(v2, probation_s=3600))
        assert d.answer is not None and d.answer.ok, d.answer.doc
        assert serving_version(dev) == 2
        old = dev.worker_pid()
        with pytest.raises(OSError):
            infer(dev)  # the worker dies on it
        dev.wait(lambda: dev.restarted(old), scaled(90), "worker restart")
        dev.wait(lambda: serving_version(dev) == 1, scaled(90), "back on v1")
        st = deploy_state(dev)
        assert st["state"] == "rolled-back" and st["version"] == 2
        assert "restarted during probation" in st["reason"]
        rec.wait_for(lambda m: any(b'"deploy-rolled-back"' in p for _t, p in m))
    assert infer(dev)[0] == 200
    refused = json.loads((tmp_path / "state/deploy/refused.json").read_text())["refused"]
    assert [(e["model"], e["version"]) for e in refused] == [("blazeface", 2)]
    d = send_deploy(s, ops, deploy_args(v2))
    assert d.answer is not None and not d.answer.ok
    assert d.answer.doc["check"] == "refused version", d.answer.doc
    assert serving_version(dev) == 1


def test_error_rate_over_the_bound_rolls_back_by_itself(
    start: Callable[..., Running], mosquitto: MosquittoBroker, tmp_path: Path  # noqa: F811
) -> None:
    dev, ops, s = start(mosquitto, env={"EDGEGUARD_FAULT": "fail-on-version:2"})
    assert infer(dev)[0] == 200  # v1 is fine
    v2 = blazeface_bundle(tmp_path, 2)
    publish_chunks(mosquitto, v2)
    d = send_deploy(s, ops, deploy_args(v2, probation_s=3600, max_error_rate=0.2))
    assert d.answer is not None and d.answer.ok, d.answer.doc
    codes = []
    for _ in range(5):  # deploy.min_requests = 5 in these tests
        codes.append(infer(dev)[0])
    assert all(c >= 500 for c in codes), codes
    dev.wait(lambda: deploy_state(dev)["state"] == "rolled-back", scaled(60), "rollback")
    assert "error rate" in deploy_state(dev)["reason"]
    dev.wait(lambda: serving_version(dev) == 1, scaled(60), "back on v1")
    assert infer(dev)[0] == 200
    d = send_deploy(s, ops, deploy_args(v2))
    assert d.answer is not None and d.answer.doc["check"] == "refused version"


def test_rollback_command_returns_to_the_previous_slot_at_once(running: Running, mosquitto: MosquittoBroker,  # noqa: F811
                                                              tmp_path: Path) -> None:
    dev, ops, s = running
    v2 = blazeface_bundle(tmp_path, 2)
    publish_chunks(mosquitto, v2)
    d = send_deploy(s, ops, deploy_args(v2, probation_s=3600))
    assert d.answer is not None and d.answer.ok, d.answer.doc
    d = deliver(s, sign(ops, "deploy", args=deploy_args(v2)), timeout=scaled(60))
    assert d.answer is not None and d.answer.doc["check"] == "deploy busy"
    d = deliver(s, sign(ops, "rollback", args={"reason": "canary wave failed"}), timeout=scaled(60))
    assert d.answer is not None and d.answer.ok, d.answer.doc
    assert d.answer.doc["result"] == {"state": "rolled-back", "model": "blazeface", "version": 1}
    assert serving_version(dev) == 1
    st = deploy_state(dev)
    assert st["state"] == "rolled-back" and st["reason"] == "canary wave failed"
    # An operator's rollback does not blacklist the version: it may be deployed again.
    assert not (tmp_path / "state/deploy/refused.json").exists()
    d = send_deploy(s, ops, deploy_args(v2, probation_s=0))
    assert d.answer is not None and d.answer.ok, d.answer.doc
    dev.wait(lambda: deploy_state(dev)["state"] == "committed", scaled(60), "commit")
    # After the commit, the floor keeps the device from going back below it.
    d = deliver(s, sign(ops, "rollback"), timeout=scaled(60))
    assert d.answer is not None and d.answer.doc["check"] == "rollback", d.answer.doc
    assert serving_version(dev) == 2


def test_fetch_resumes_after_the_broker_restarts_mid_transfer(
    start: Callable[..., Running], broker_factory: Callable[..., MosquittoBroker], tmp_path: Path  # noqa: F811
) -> None:
    broker = broker_factory(persistence=True)
    dev, ops, s = start(broker)
    v2 = blazeface_bundle(tmp_path, 2)
    total = -(-len(v2) // 16384)
    half = total // 2
    publish_chunks(broker, v2, only=lambda level: level == "meta" or (level.isdigit() and int(level) < half))
    # Sent without waiting for the answer: the operator's own connection goes down with the broker.
    s.send(sign(ops, "deploy", args=deploy_args(v2), ttl_s=600), timeout=0.1, devices=["dev-1"])
    dev.wait(lambda: deploy_state(dev).get("chunks", {}).get("have") == half, scaled(60), "half the chunks")
    broker.restart(kill=False)  # a clean stop saves the retained chunks (persistence), as a broker would
    log = tmp_path / "service.log"
    dev.wait(lambda: log.read_text().count("link: connected to") >= 2, scaled(60), "link back")
    # The device kept what it had and waits on the missing half only.
    assert deploy_state(dev)["state"] == "fetching" and deploy_state(dev)["chunks"]["have"] >= half
    publish_chunks(broker, v2, only=lambda level: level.isdigit() and int(level) >= half)
    dev.wait(lambda: deploy_state(dev)["state"] in ("probation", "committed"), scaled(120), "switched")
    assert serving_version(dev) == 2


def _spares_ready(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"spare worker (\d+) ready", log.read_text())]


def test_a_spare_worker_never_takes_over_with_the_model_of_before_the_deploy(
    tmp_path: Path, mosquitto: MosquittoBroker  # noqa: F811
) -> None:
    dev, ops = deploy_device(tmp_path, mosquitto)
    dev.config.write_text(dev.config.read_text().replace("fault_injection = true", "fault_injection = true\n"
                                                         "spare_worker = true", 1))
    log = tmp_path / "service.log"
    dev.start(start_new_session=True)
    try:
        dev.wait_ready()
        dev.wait(lambda: len(_spares_ready(log)) >= 1, scaled(120), "a spare worker ready")
        dev.wait((tmp_path / "state/device-sign.pub").exists, 60, "answer key")
        v2 = blazeface_bundle(tmp_path, 2)
        publish_chunks(mosquitto, v2)
        s = online_sender(mosquitto, dev)
        try:
            d = send_deploy(s, ops, deploy_args(v2, probation_s=0))
            assert d.answer is not None and d.answer.ok, d.answer.doc
        finally:
            s.close()
        dev.wait(lambda: deploy_state(dev)["state"] == "committed", scaled(60), "commit")
        # The spare of before (holding v1) was dropped; a new one loads the committed slot.
        dev.wait(lambda: len(_spares_ready(log)) >= 2, scaled(120), "a new spare")
        serving = dev.worker_pid()
        assert serving is not None
        os.kill(serving, signal.SIGKILL)
        dev.wait(lambda: dev.restarted(serving), scaled(60), "the spare took over")
        assert serving_version(dev) == 2
    finally:
        dev.stop()
