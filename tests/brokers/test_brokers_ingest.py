"""`edgeguard fleet ingest` needs MQTT 5 shared subscriptions, which neither RabbitMQ 3.10's MQTT plugin nor
NATS 2.9 has: the worker keeps running and its status names what is missing (instead of an unexplained
"not connected")."""

from __future__ import annotations

from pathlib import Path

from tests.fleet._support import IngestProc, write_config
from tests.support.brokers import ExternalBroker


def test_ingest_status_says_it_needs_an_mqtt5_broker(
    clusterable: ExternalBroker, pg_dsn: str, tmp_path: Path
) -> None:
    status = tmp_path / "status.json"
    cfg = write_config(
        tmp_path / "ingest.toml",
        fleet="f1",
        dsn=pg_dsn,
        broker=clusterable,  # type: ignore[arg-type]
        client_id="ingest-1",
        status_file=status,
    )
    proc = IngestProc(cfg, status, tmp_path / "ingest.log").start()
    try:
        needs = "MQTT 5 broker with shared subscriptions"
        snap = proc.wait_status(lambda s: needs in (s.get("reason") or ""), 60)
        assert snap["state"] == "degraded" and snap["mqtt"]["connected"] is False, snap
        nats = clusterable.kind == "nats"
        why = "broker refused the connection" if nats else "closed the connection before"
        assert why in snap["reason"], snap["reason"]
    finally:
        assert proc.stop() == 0
