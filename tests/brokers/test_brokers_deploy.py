"""Remote deploy through RabbitMQ's MQTT plugin and NATS's MQTT support, unchanged, with mosquitto beside them
as the baseline: a real device service (`edgeguard run`, [commands] enabled, serving the zoo's BlazeFace)
takes a one-wave rollout (the operator's rollout engine and its MQTT transport, MQTT 3.1.1) through probation
to committed, then a signed ``deploy`` over retained chunks, answered verified, and a ``rollback`` command.

The device fetches a bundle with exact-topic subscriptions only (RabbitMQ hands retained messages to no
wildcard subscription): the bundle travels in 15 chunks of 16 KiB, more than the device's subscription
window, so the window has to slide for the transfer to finish. The time from the first chunk published to
the device's verified answer (fetched, digest checked, verified, self-tested, switched) is kept per broker
and printed in the terminal summary, the same bundle each time (tests/brokers/conftest.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeguard.deploy._fetch import WINDOW
from edgeguard.fleet.rollout import (
    AnswerSeen,
    MqttTransport,
    Rollout,
    RolloutEngine,
    Settings,
    Wave,
)
from edgeguard.keys import load_verify_key
from edgeguard.link import LinkConfig
from tests.commands._support import FLEET
from tests.deploy._support import (
    CHUNK,
    blazeface_bundle,
    deploy_device,
    deploy_state,
    infer,
    serving_version,
)
from tests.service._env import Device
from tests.support.broker import MosquittoBroker, broker_factory, mosquitto  # noqa: F401
from tests.support.brokers import DEPLOY_TIMES, ExternalBroker
from tests.support.slowdown import scaled

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(params=["mosquitto", "rabbitmq", "nats"])
def any_broker(request: pytest.FixtureRequest) -> MosquittoBroker | ExternalBroker:
    name = "mosquitto" if request.param == "mosquitto" else f"{request.param}_broker"
    broker: MosquittoBroker | ExternalBroker = request.getfixturevalue(name)
    return broker


def _transport(broker: Any, root: Path, ops: Any) -> MqttTransport:
    pinned = {"dev-1": load_verify_key(root / "state/device-sign.pub", "device-sign")}
    t = MqttTransport(broker=LinkConfig(host=broker.host, port=broker.port, protocol="3.1.1"), fleet=FLEET,
                      sign_key=ops, pinned=pinned, chunk_size=CHUNK)
    t.connect(timeout=scaled(30))
    return t


def _answer(t: MqttTransport, nonce: str, timeout: float) -> AnswerSeen:
    """The device's answer to the command ``nonce`` (verified with its pinned key: the transport keeps
    only answers that verify)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        for obs in t.poll(0.5):
            if isinstance(obs, AnswerSeen) and obs.device == "dev-1" and obs.nonce == nonce:
                return obs
    raise AssertionError(f"no verified answer to {nonce} within {scaled(timeout):g} s")


def _online(dev: Device, t: MqttTransport) -> None:
    """The device's link is up (a heartbeat came through the broker): a command sent before it subscribed to
    its ``cmd`` topic would be lost (READY does not wait for the broker)."""
    dev.wait(lambda: any(obs.device == "dev-1" for obs in t.poll(0.5)), scaled(60), "a heartbeat")


@pytest.fixture
def device(any_broker: Any, tmp_path: Path) -> Iterator[tuple[Device, Any, MqttTransport]]:
    dev, ops = deploy_device(tmp_path, any_broker)
    dev.start()
    t: MqttTransport | None = None
    try:
        dev.wait_ready()
        t = _transport(any_broker, tmp_path, ops)
        _online(dev, t)
        yield dev, ops, t
    finally:
        if t is not None:
            t.close()
        dev.stop()


def test_rollout_deploy_and_rollback_through_the_broker(
    any_broker: Any, device: tuple[Device, Any, MqttTransport], tmp_path: Path
) -> None:
    dev, _ops, t = device
    assert serving_version(dev) == 1
    v2, v3 = blazeface_bundle(tmp_path, 2), blazeface_bundle(tmp_path, 3)
    assert -(-len(v3) // CHUNK) > WINDOW  # more chunks than the device subscribes to at once

    # -- a one-wave rollout, the operator's engine and transport: published, deployed, probation, committed
    settings = Settings(probation_s=2, max_error_rate=0.5, answer_timeout_s=scaled(180),
                        commit_grace_s=scaled(60))
    kind = getattr(any_broker, "kind", "mosquitto")
    r = Rollout(id=f"v2-{kind}", model="blazeface", version=2, sha256=hashlib.sha256(v2).hexdigest(),
                size=len(v2), bundle="v2.egm", group="dev-1",
                max_failures=0, settings=settings, started=time.time(),
                waves=[Wave(index=0, percent=100, devices=["dev-1"])])
    (tmp_path / "operator").mkdir()
    done = RolloutEngine(r, root=tmp_path / "operator", transport=t, bundle=lambda: v2, tick_s=0.2).run()
    assert done.state == "done" and done.waves[0].ok == ["dev-1"], done.to_json()
    assert serving_version(dev) == 2 and deploy_state(dev)["state"] == "committed"
    assert infer(dev)[0] == 200

    # -- a signed deploy over retained chunks, timed from the first chunk published to the verified answer
    start = time.monotonic()
    t.publish_bundle(v3)
    args = Settings(probation_s=3600).deploy_args(sha256=hashlib.sha256(v3).hexdigest(), size=len(v3),
                                                  rollout="")
    del args["rollout"]
    a = _answer(t, t.send("dev-1", "deploy", args), 180)
    took = time.monotonic() - start
    assert a.ok and a.result["state"] == "probation" and a.result["version"] == 3, (a, dev.log_tail())
    DEPLOY_TIMES.append((kind, len(v3), -(-len(v3) // CHUNK), took))
    assert serving_version(dev) == 3

    # -- the operator's rollback: back to the committed v2 at once
    a = _answer(t, t.send("dev-1", "rollback", {"reason": "canary failed"}), 60)
    assert a.ok and a.result == {"state": "rolled-back", "model": "blazeface", "version": 2}, a
    assert serving_version(dev) == 2
    assert deploy_state(dev)["state"] == "rolled-back"
    t.remove_bundle(hashlib.sha256(v3).hexdigest(), len(v3))
