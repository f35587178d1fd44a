"""Home Assistant MQTT discovery: the configs the link publishes, checked against HA's documented schema.

docs/schemas/ha-config.json is the subset of HA's discovery config we rely on, written from HA's
MQTT docs (sensor, binary_sensor, device registry, availability). The same configs, as a real device publishes
them to a real broker, are checked in test_view_schemas.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edgeguard.link._discovery import discovery_messages

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/schemas/ha-config.json").read_text())
PREFIX = "edgeguard/v1/plant-1/cam.7/"
TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config$")


def configs(device: str = "cam.7", fleet: str = "plant-1") -> dict[str, dict[str, Any]]:
    out = {}
    prefix = f"edgeguard/v1/{fleet}/{device}/"
    for topic, payload in discovery_messages("homeassistant", fleet, device, prefix):
        out[topic] = json.loads(payload)
    return out


def check_ha_config(topic: str, cfg: dict[str, Any]) -> None:
    """Raise unless (topic, cfg) is a discovery config HA accepts for the component the topic names."""
    m = TOPIC.fullmatch(topic)
    assert m is not None, f"not a discovery topic HA reads: {topic}"
    jsonschema.validate(cfg, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert cfg["default_entity_id"].startswith(m.group(1) + "."), (topic, cfg["default_entity_id"])


def test_every_config_follows_home_assistants_documented_schema() -> None:
    found = configs()
    assert found
    for topic, cfg in found.items():
        check_ha_config(topic, cfg)


def test_the_schema_refuses_what_home_assistant_refuses() -> None:
    """The schema is not a rubber stamp: each documented rule, broken once, fails validation."""
    topic, good = next((t, c) for t, c in configs().items() if t.endswith("/degraded/config"))
    check_ha_config(topic, good)
    broken: list[dict[str, Any]] = [
        {**good, "object_id": "x"},  # deprecated, ignored since HA Core 2026.4
        {k: v for k, v in good.items() if k != "unique_id"},  # no device registry without it
        {**good, "device": {"name": "no identifiers"}},
        {**good, "availability_topic": PREFIX + "status"},  # with `availability`: not both
        {**good, "state_topic": "edgeguard/v1/+/x"},
        {**good, "made_up_key": 1},
        {**good, "entity_category": "sensor"},
    ]
    for cfg in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(cfg, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_online_and_degraded_binary_sensors_and_every_useful_sensor_are_announced() -> None:
    by_id = {topic.split("/")[3]: (topic.split("/")[1], cfg) for topic, cfg in configs().items()}
    assert by_id["online"][0] == "binary_sensor"
    assert by_id["online"][1]["device_class"] == "connectivity"
    assert by_id["degraded"][0] == "binary_sensor"
    assert by_id["degraded"][1]["device_class"] == "problem"
    useful = {
        "uptime", "model", "fast_path", "degraded_reason", "inferences", "latency_p50", "latency_p99",
        "rejected_inputs", "outbox_depth", "outbox_oldest_age", "outbox_dropped", "outbox_alarm",
        "link_connects", "restarts", "mtbf", "mttr", "cpu_temperature",
    }
    assert useful <= {k for k, (component, _) in by_id.items() if component == "sensor"}


def test_availability_follows_the_lwt_and_online_reads_the_status_itself() -> None:
    for topic, cfg in configs().items():
        if topic.split("/")[3] == "online":
            # Its state *is* the status topic; gated by availability it could never show "off".
            assert cfg["state_topic"] == PREFIX + "status"
            assert (cfg["payload_on"], cfg["payload_off"]) == ("online", "offline")
            assert "availability" not in cfg
            continue
        assert cfg["availability"] == [
            {
                "topic": PREFIX + "status",
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]


def test_device_registry_info_and_unique_ids_are_stable_and_distinct() -> None:
    first, again, other = configs(), configs(), configs(device="cam-8")
    assert first == again  # a restart announces the very same entities
    ids = [cfg["unique_id"] for cfg in first.values()]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {cfg["unique_id"] for cfg in other.values()}
    devices = {json.dumps(cfg["device"], sort_keys=True) for cfg in first.values()}
    assert len(devices) == 1  # every entity lands on one registry device
    device = first[next(iter(first))]["device"]
    assert device["identifiers"] and device["manufacturer"] == "EdgeGuard"
    assert device["serial_number"] == "cam.7" and device["sw_version"]
