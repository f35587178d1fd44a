"""Deploy end to end on real components: mosquitto, the real `edgeguard run` service (supervisor + worker),
the zoo's BlazeFace sealed with the repo's packer, signed commands from the operator-side sender."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeguard.bundle import RollbackFloor
from edgeguard import zoo
from edgeguard.fleet.commands import CommandSender
from tests.commands._support import deliver, sender, sign
from tests.deploy._support import (
    blazeface_bundle,
    deploy_args,
    deploy_device,
    deploy_state,
    infer,
    publish_chunks,
    send_deploy,
    serving_version,
)
from tests.service._env import Device
from tests.support.broker import MosquittoBroker, Recorder, broker_factory, mosquitto  # noqa: F401
from tests.support.slowdown import scaled

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def running(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[tuple[Device, object, CommandSender]]:  # noqa: F811
    dev, ops = deploy_device(tmp_path, mosquitto)
    dev.start(start_new_session=True)
    try:
        dev.wait_ready()
        dev.wait(lambda: (tmp_path / "state/device-sign.pub").exists(), 60, "answer key")
        s = sender(mosquitto, tmp_path)
        try:
            yield dev, ops, s
        finally:
            s.close()
    finally:
        dev.stop()


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
    running: tuple[Device, object, CommandSender], mosquitto: MosquittoBroker, tmp_path: Path  # noqa: F811
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
        rec.wait_for(lambda m: any(b'"deploy": {"state": "committed"' in p or b'"deploy":{"state":"committed"' in p
                                   for t, p in m if t.endswith("/heartbeat")))
    record = json.loads((tmp_path / "state/slots/record.json").read_text())
    assert record["active"] == "a" and record["previous"] == "config" and record["state"] == "committed"
    _no_plaintext(tmp_path)
    # The audit log recorded the deploy events.
    audit = b"".join(p.read_bytes() for p in (tmp_path / "state/audit").rglob("*") if p.is_file())
    assert b"deploy-committed" in audit


def test_deploy_from_path_and_the_older_version_refused(
    running: tuple[Device, object, CommandSender], tmp_path: Path
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
