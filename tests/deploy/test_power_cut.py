"""A power cut at every step of a deploy: the real `edgeguard run` service (supervisor and worker, in a
session of their own) is stopped by a fault hook at a step boundary or in the middle of writing a file
(``EDGEGUARD_FAULT=deploy-pause:STEP``), killed with SIGKILL there, and started again without the hook. It
must boot serving a verified model: the old one before the commit point (the record saying ``committed``),
the new one after it; nothing half-written is used, nothing plaintext is on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard import zoo
from edgeguard.bundle import RollbackFloor
from edgeguard.deploy import STEPS
from tests.commands._support import sign
from tests.deploy._support import (
    blazeface_bundle,
    deploy_args,
    deploy_device,
    deploy_state,
    infer,
    kill_service,
    online_sender,
    publish_chunks,
    serving_version,
)
from tests.support.broker import MosquittoBroker, broker_factory, mosquitto  # noqa: F401
from tests.support.slowdown import scaled

pytestmark = pytest.mark.timeout(600)

AFTER_COMMIT = {"committed", "floor-raised"}


def _boot_again(dev: object, tmp_path: Path) -> None:
    dev.start(start_new_session=True)  # type: ignore[attr-defined]
    dev.wait_ready()  # type: ignore[attr-defined]


def _check_disk(root: Path) -> None:
    state = root / "state"
    assert not list((state / "deploy").glob("partial-*")), "a partial bundle survived the restart"
    assert not [p for d in (state / "slots", state / "deploy") if d.is_dir() for p in d.glob(".*.tmp")]
    needle = zoo.fetch("blazeface").read_bytes()[4096:4160]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert needle not in path.read_bytes(), f"plaintext model bytes in {path}"


@pytest.mark.parametrize("step", STEPS)
def test_power_cut_at_each_step_boots_a_verified_model(
    step: str, tmp_path: Path, mosquitto: MosquittoBroker  # noqa: F811
) -> None:
    dev, ops = deploy_device(tmp_path, mosquitto)
    dev.start(env={"EDGEGUARD_FAULT": f"deploy-pause:{step}"}, start_new_session=True)
    try:
        dev.wait_ready()
        dev.wait(lambda: (tmp_path / "state/device-sign.pub").exists(), 60, "answer key")
        v2 = blazeface_bundle(tmp_path, 2)
        publish_chunks(mosquitto, v2)
        s = online_sender(mosquitto, dev)
        try:
            s.send(sign(ops, "deploy", args=deploy_args(v2, probation_s=1), ttl_s=600), timeout=0.1,
                   devices=["dev-1"])
        finally:
            s.close()
        marker = tmp_path / f"state/deploy/paused-{step}"
        dev.wait(marker.exists, scaled(120), f"the deploy to reach {step}")
        kill_service(dev)
        marker.unlink()
        _boot_again(dev, tmp_path)
        want = 2 if step in AFTER_COMMIT else 1
        dev.wait(lambda: serving_version(dev) == want, scaled(60), f"serving v{want}")
        assert infer(dev)[0] == 200
        st = deploy_state(dev)
        if want == 2:
            assert st["state"] == "committed" and st["version"] == 2
            # The floor is raised at the latest when the committed slot is opened at boot.
            assert RollbackFloor(tmp_path / "state").get("blazeface") == 2
        else:
            assert RollbackFloor(tmp_path / "state").get("blazeface") == 1
            # Past the switch, the record said probation: a restart on probation is a failed probation.
            on_probation = step in {"switched", "mid-commit"}
            assert st["state"] == ("rolled-back" if on_probation else "idle"), st
        _check_disk(tmp_path)
    finally:
        dev.stop()


def test_power_cut_during_probation_comes_back_on_the_old_model(
    tmp_path: Path, mosquitto: MosquittoBroker  # noqa: F811
) -> None:
    dev, ops = deploy_device(tmp_path, mosquitto)
    dev.start(start_new_session=True)
    try:
        dev.wait_ready()
        dev.wait(lambda: (tmp_path / "state/device-sign.pub").exists(), 60, "answer key")
        v2 = blazeface_bundle(tmp_path, 2)
        publish_chunks(mosquitto, v2)
        s = online_sender(mosquitto, dev)
        try:
            s.send(sign(ops, "deploy", args=deploy_args(v2, probation_s=3600), ttl_s=600), timeout=0.1,
                   devices=["dev-1"])
        finally:
            s.close()
        dev.wait(lambda: deploy_state(dev)["state"] == "probation", scaled(120), "probation")
        assert serving_version(dev) == 2
        kill_service(dev)
        _boot_again(dev, tmp_path)
        dev.wait(lambda: serving_version(dev) == 1, scaled(60), "serving v1")
        st = deploy_state(dev)
        assert st["state"] == "rolled-back" and st["version"] == 2
        _check_disk(tmp_path)
    finally:
        dev.stop()
