"""Home Assistant MQTT discovery: retained sensor configs whose availability follows our `status` topic."""

from __future__ import annotations

import json

__all__ = ["discovery_messages"]

# (object id, name, value template over the heartbeat JSON, unit, device class)
_SENSORS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("uptime", "Uptime", "{{ value_json.uptime_s }}", "s", "duration"),
    ("outbox_depth", "Outbox depth", "{{ value_json.outbox.depth }}", None, None),
    ("outbox_oldest_age", "Outbox oldest age", "{{ value_json.outbox.oldest_age_s or 0 }}", "s", "duration"),
    ("outbox_dropped", "Results dropped", "{{ value_json.outbox.dropped_total }}", None, None),
    ("outbox_alarm", "Outbox alarm", "{{ value_json.outbox.alarm or 'ok' }}", None, None),
    ("link_connects", "Broker connects", "{{ value_json.link.connects }}", None, None),
)


def discovery_messages(ha_prefix: str, fleet: str, device_id: str, prefix: str) -> list[tuple[str, bytes]]:
    """(topic, payload) pairs, published retained on every connect."""
    node = f"edgeguard_{fleet}_{device_id}".replace(".", "_").replace("-", "_")
    device = {
        "identifiers": [node],
        "name": f"EdgeGuard {device_id}",
        "manufacturer": "EdgeGuard",
        "model": f"fleet {fleet}",
    }
    out: list[tuple[str, bytes]] = []
    for object_id, name, template, unit, device_class in _SENSORS:
        cfg: dict[str, object] = {
            "name": name,
            "unique_id": f"{node}_{object_id}",
            "object_id": f"{node}_{object_id}",
            "state_topic": prefix + "heartbeat",
            "value_template": template,
            "availability_topic": prefix + "status",
            "availability_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
        }
        if unit:
            cfg["unit_of_measurement"] = unit
        if device_class:
            cfg["device_class"] = device_class
        out.append((f"{ha_prefix}/sensor/{node}/{object_id}/config", json.dumps(cfg).encode()))
    return out
