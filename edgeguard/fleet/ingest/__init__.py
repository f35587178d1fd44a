"""``edgeguard fleet ingest``: a fleet's results, heartbeats, status and events into PostgreSQL, exactly once.

An MQTT 5 shared subscription with manual acknowledgements feeds a batch writer; a message is acknowledged to
the broker only after its row is committed, and rows are keyed by the device's own ids, so redelivered or
duplicated messages are stored once. See docs/ingest.md.
"""

from __future__ import annotations

from edgeguard.fleet.ingest._config import BrokerConfig, IngestConfig, load_ingest_config
from edgeguard.fleet.ingest._schema import SCHEMA_VERSION, maintain_partitions, migrate
from edgeguard.fleet.ingest._worker import IngestWorker

__all__ = [
    "BrokerConfig",
    "IngestConfig",
    "IngestWorker",
    "SCHEMA_VERSION",
    "load_ingest_config",
    "maintain_partitions",
    "migrate",
]
