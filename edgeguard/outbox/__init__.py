"""Durable store-and-forward queue for results (SQLite WAL, group commit, AES-GCM at rest).

A result is committed before ``put()`` returns; the MQTT link reads with ``peek()`` and removes a result with
``ack()`` only after the broker's PUBACK. See docs/outbox.md.
"""

from __future__ import annotations

from edgeguard.outbox._config import OutboxConfig, OutboxItem, OutboxStats
from edgeguard.outbox._outbox import Outbox

__all__ = ["Outbox", "OutboxConfig", "OutboxItem", "OutboxStats"]
