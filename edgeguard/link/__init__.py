"""MQTT link (paho-mqtt 2.x): birth/LWT status, heartbeat, results from the outbox, events, inbound topics.

A result leaves the outbox only after the broker's PUBACK. See docs/link.md.
"""

from __future__ import annotations

from edgeguard.link._config import Backoff, LinkConfig, LinkState
from edgeguard.link._link import MqttLink
from edgeguard.link._netloop import tls_context

__all__ = ["MqttLink", "LinkConfig", "LinkState", "Backoff", "tls_context"]
