"""Home Assistant MQTT discovery: one retained config per entity, published on every connect.

Follows HA's MQTT discovery docs (integrations/mqtt, sensor.mqtt, binary_sensor.mqtt): topic
``<ha_prefix>/<component>/<node>/<entity>/config``; a ``device`` block so every entity lands on one registry
device; ``unique_id`` built from fleet, device and entity only, so it is the same after every restart;
``default_entity_id`` (HA deprecated ``object_id`` for it and ignores ``object_id`` since Core 2026.4).
Availability comes from our ``status`` topic, which carries the birth and the LWT: when the device dies, HA
marks its entities unavailable. The ``online`` binary sensor reads that topic as its state instead (gated by
availability it could never show "off"). Sensors read the heartbeat JSON with ``value_template``s; a field the
heartbeat lacks (no model loaded) renders ``None``, which HA shows as unknown.
"""

from __future__ import annotations

import json

from edgeguard import __version__

__all__ = ["discovery_messages"]

_NUM = (
    "{{{{ value_json.{path} if value_json.{guard} is defined and value_json.{path} is not none else None }}}}"
)


def _num(path: str) -> str:
    """A template for a number nested in the heartbeat, None (HA: unknown) when any level is missing."""
    guard = path.rsplit(".", 1)[0] if "." in path else path
    return _NUM.format(path=path, guard=guard)


# (entity, name, value template over the heartbeat, unit, device class, state class, diagnostic?)
_SENSORS: tuple[tuple[str, str, str, str | None, str | None, str | None, bool], ...] = (
    ("model", "Model", "{{ value_json.model.name ~ '@' ~ value_json.model.version if value_json.model "
     "else 'none' }}", None, None, None, False),
    ("fast_path", "Fast path", "{{ value_json.accelerator or 'none' }}", None, None, None, False),
    ("degraded_reason", "Degraded reason", "{{ value_json.degraded_reason or 'ok' }}", None, None, None,
     False),
    ("inferences", "Inferences", _num("inferences"), None, None, "total_increasing", False),
    ("latency_p50", "Latency p50", _num("latency_ms.p50"), "ms", "duration", "measurement", False),
    ("latency_p99", "Latency p99", _num("latency_ms.p99"), "ms", "duration", "measurement", False),
    ("rejected_inputs", "Rejected inputs", _num("rejected"), None, None, "total_increasing", False),
    ("outbox_depth", "Outbox depth", _num("outbox.depth"), None, None, "measurement", False),
    ("outbox_oldest_age", "Outbox oldest age", "{{ value_json.outbox.oldest_age_s or 0 }}", "s", "duration",
     "measurement", False),
    ("outbox_dropped", "Results dropped", _num("outbox.dropped_total"), None, None, "total_increasing",
     False),
    ("outbox_alarm", "Outbox alarm", "{{ value_json.outbox.alarm or 'ok' }}", None, None, None, False),
    ("uptime", "Uptime", _num("uptime_s"), "s", "duration", "measurement", True),
    ("link_connects", "Broker connects", _num("link.connects"), None, None, "total_increasing", True),
    ("restarts", "Restarts", _num("supervisor.restarts"), None, None, "total_increasing", True),
    ("mtbf", "MTBF", _num("supervisor.mtbf_s"), "s", "duration", "measurement", True),
    ("mttr", "MTTR", _num("supervisor.mttr_s"), "s", "duration", "measurement", True),
    ("cpu_temperature", "CPU temperature", _num("system.cpu_temp_c"), "°C", "temperature", "measurement",
     True),
)


def discovery_messages(ha_prefix: str, fleet: str, device_id: str, prefix: str) -> list[tuple[str, bytes]]:
    """(topic, payload) pairs, published retained on every connect."""
    node = f"edgeguard_{fleet}_{device_id}".replace(".", "_").replace("-", "_")
    entity_base = node.lower()  # entity ids are lower case in HA
    device = {
        "identifiers": [node],
        "name": f"EdgeGuard {device_id}",
        "manufacturer": "EdgeGuard",
        "model": f"fleet {fleet}",
        "serial_number": device_id,
        "sw_version": __version__,
    }
    availability = [
        {
            "topic": prefix + "status",
            "value_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    out: list[tuple[str, bytes]] = []

    def add(component: str, entity: str, cfg: dict[str, object]) -> None:
        full = {
            **cfg,
            "unique_id": f"{node}_{entity}",
            "default_entity_id": f"{component}.{entity_base}_{entity}",
            "device": device,
        }
        out.append((f"{ha_prefix}/{component}/{node}/{entity}/config", json.dumps(full).encode()))

    add("binary_sensor", "online", {
        "name": "Online",
        "state_topic": prefix + "status",
        "value_template": "{{ value_json.state }}",
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
    })
    add("binary_sensor", "degraded", {
        "name": "Degraded",
        "state_topic": prefix + "heartbeat",
        "value_template": "{{ 'ON' if value_json.degraded else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "problem",
        "availability": availability,
    })
    for entity, name, template, unit, device_class, state_class, diagnostic in _SENSORS:
        cfg: dict[str, object] = {
            "name": name,
            "state_topic": prefix + "heartbeat",
            "value_template": template,
            "availability": availability,
        }
        if unit:
            cfg["unit_of_measurement"] = unit
        if device_class:
            cfg["device_class"] = device_class
        if state_class:
            cfg["state_class"] = state_class
        if diagnostic:
            cfg["entity_category"] = "diagnostic"
        add("sensor", entity, cfg)
    return out
