"""docs/schemas/*.json: every topic's payload as a real device publishes it (the service as a child process
on a real mosquitto), and as tools/fleet_sim.py publishes it, is valid against its schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fleet._sim import ROOT, SimFleet
from tests.fleet.test_view_ha import check_ha_config
from tests.service._env import Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

SCHEMAS = {p.stem: json.loads(p.read_text()) for p in (ROOT / "docs" / "schemas").glob("*.json")}
DEVICE_TOPICS = ("status", "heartbeat", "results", "events")


def validate(kind: str, doc: Any) -> None:
    jsonschema.validate(doc, SCHEMAS[kind], cls=jsonschema.Draft202012Validator)


def check_all(messages: list[tuple[str, bytes]]) -> dict[str, int]:
    """Validate every message by its topic; returns how many of each kind were checked."""
    seen: dict[str, int] = {}
    for topic, payload in messages:
        kind = topic.rsplit("/", 1)[-1]
        if topic.startswith("homeassistant/"):
            check_ha_config(topic, json.loads(payload))
            kind = "ha-config"
        elif kind in DEVICE_TOPICS:
            validate(kind, json.loads(payload))
        else:
            continue
        seen[kind] = seen.get(kind, 0) + 1
    return seen


def test_every_topic_a_real_device_publishes_matches_its_schema(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), link_extra="ha_discovery = true\n")
        dev.start()
        try:
            dev.wait_ready()
            code, _ = dev.request("POST", "/v1/infer", b'{"inputs": {"x": [[0, 0.5, 1, 0.25]]}}')
            assert code == 200
            # A bad input on the MQTT input topic: refused, and said so on the events topic.
            client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            client.connect(broker.host, broker.port)
            client.loop_start()
            client.publish("edgeguard/v1/test/dev-1/input", b"{not json", qos=1).wait_for_publish(5)
            client.disconnect()
            client.loop_stop()
            assert rec.wait_for(lambda m: any(t.endswith("/events") for t, _ in m), 20), dev.log_tail()
            assert rec.wait_for(lambda m: any(t.endswith("/results") for t, _ in m), 20)
            assert rec.wait_for(
                lambda m: any(t.endswith("/heartbeat") and b'"serving"' in p for t, p in m), 20
            )
        finally:
            assert dev.stop() == 0
        assert rec.wait_for(lambda m: any(t.endswith("/status") and b"offline" in p for t, p in m), 10)
        seen = check_all(rec.snapshot())
    assert set(seen) == {*DEVICE_TOPICS, "ha-config"}, seen
    assert seen["status"] >= 2  # the birth and the goodbye


def test_the_simulator_speaks_the_devices_schemas(
    broker_factory: Callable[..., MosquittoBroker], recorder_factory: Callable[..., Recorder]
) -> None:
    broker = broker_factory()
    rec = recorder_factory(broker, "edgeguard/#")
    with SimFleet(broker, 3, "--fleet", "fs", "--heartbeat", "0.2", "--groups", "a,b") as sim:
        sim.expect("ready 3")
        sim.send("degrade sim-0001 npu lost")
        sim.send("event sim-0002 bundle-rejected")
        assert rec.wait_for(lambda m: sum(t.endswith("/results") for t, _ in m) >= 3, 10)
        assert rec.wait_for(lambda m: any(t.endswith("/events") for t, _ in m), 10)
        sim.send("drop sim-0000")
        assert rec.wait_for(lambda m: any(t.endswith("/status") and b"offline" in p for t, p in m), 10)
        received = sum(t.endswith("/heartbeat") for t, _ in rec.snapshot())  # all sent before `stats`
        sim.send("stats")
        assert int(sim.expect("stats ").split()[1].split("=")[1]) >= received > 0
        sim.send("quit")  # the others say goodbye: offline with their time, then the simulator exits
        assert sim.proc.wait(10) == 0
        assert rec.wait_for(lambda m: sum(t.endswith("/status") and b'"time"' in p and b"offline" in p
                                          for t, p in m) == 2, 10)
    seen = check_all(rec.snapshot())
    assert set(seen) == set(DEVICE_TOPICS), seen


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        ("status", {"state": "pwned", "device": "d"}),
        ("status", {"state": "online"}),
        ("results", {"id": "d", "seq": 1, "kind": "result", "priority": False, "created": 1.0, "data": {}}),
        ("events", {"kind": "degraded", "time": 1.0, "device": "d"}),  # a degraded event says why
        ("heartbeat", {"device": "d", "time": 1.0, "uptime_s": 1.0, "sequence": 1}),
    ],
)
def test_the_schemas_refuse_what_consumers_could_not_use(kind: str, doc: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(kind, doc)
