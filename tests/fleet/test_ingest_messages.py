"""What devices publish, as the ingest worker stores it: the device link's own envelope, heartbeats, status
and events, and bad messages (rejected one by one, acknowledged, the worker keeps serving)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from edgeguard.fleet.ingest import SCHEMA_VERSION, migrate
from edgeguard.fleet.ingest._parse import ResultRow, parse_message
from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox
from tests.fleet._support import IngestProc, Publisher, count, envelope, wait_rows, write_config
from tests.support.broker import MosquittoBroker, Pki, Recorder

FLEET = "site-b"


def test_test_publisher_envelope_is_byte_identical_to_the_device_link(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """The tests publish results built by tests/fleet/_support.envelope; a real device (Outbox + MqttLink)
    must publish exactly those bytes for the same fields, or every other ingest test proves nothing."""
    ob = Outbox(path=tmp_path / "outbox.db", storage_key=bytes(32), device_id="cam-7")
    link = MqttLink(
        config=LinkConfig(port=mosquitto.port, heartbeat_s=3600.0, backoff_initial_s=0.05),
        fleet=FLEET,
        device_id="cam-7",
        outbox=ob,
    )
    with Recorder(mosquitto, f"edgeguard/v1/{FLEET}/cam-7/results") as rec:
        link.start()
        try:
            payloads = [b'{"label":"cat","score":0.5,"latency_ms":3.25}', b'{"boxes":[[1,2,3,4]],"n":1}']
            ob.put(payloads[0])
            ob.put(payloads[1], priority=True, kind="detection")
            assert rec.wait_for(lambda m: len(m) >= 2, timeout=20)
        finally:
            link.stop()
            ob.close()
    sent = [p for _, p in rec.snapshot()][:2]
    for raw, data, kind, prio in zip(sent, payloads, ("result", "detection"), (False, True), strict=True):
        doc = json.loads(raw)
        assert raw == envelope(
            "cam-7", doc["seq"], created=doc["created"], data=data, kind=kind, priority=prio
        )
        row = parse_message(
            f"edgeguard/v1/{FLEET}/cam-7/results",
            raw,
            fleet=FLEET,
            received=time.time(),
            max_payload_bytes=4096,
        )
        assert isinstance(row, ResultRow)
        assert (row.result_id, row.kind, row.priority) == (doc["id"], kind, prio)
        assert json.loads(row.data) == json.loads(data)


def _proc(tmp_path: Path, broker: MosquittoBroker, dsn: str, **extra: object) -> IngestProc:
    status = tmp_path / "w.status.json"
    cfg = write_config(
        tmp_path / "w.toml",
        fleet=FLEET,
        dsn=dsn,
        broker=broker,
        client_id="ingest-m",
        status_file=status,
        **extra,
    )
    return IngestProc(cfg, status, tmp_path / "w.log")


BAD = [
    ("results", b"not json"),
    ("results", b"[1,2,3]"),
    (
        "results",
        b'{"id":"cam-9:1","seq":1,"kind":"result","priority":false,"created":1790000000.0,"data":{}}',
    ),
    ("results", b'{"id":"cam-1:1","seq":1,"kind":"result","priority":false,"created":NaN,"data":{}}'),
    (
        "results",
        b'{"id":"cam-1:2","seq":2,"kind":"result","priority":false,"created":1790000000.0,'
        b'"data":{"s":"a\\u0000b"}}',
    ),
    (
        "results",
        b'{"id":"cam-1:3","seq":3,"kind":"result","priority":false,"created":1790000000.0,'
        b'"data":{"s":"\\ud800"}}',
    ),
    ("results", b'{"id":"cam-1:4","seq":4,"kind":"result","priority":false,"created":12.0,"data":{}}'),
    (
        "results",
        b'{"id":"cam-1:5","seq":5,"kind":"result","priority":false,"created":1790000000.0,'
        b'"data":"' + b"x" * 5000 + b'"}',
    ),
    ("results", b"[" * 2000 + b"]" * 2000),  # nesting past the JSON parser's recursion limit
    ("bogus", b"{}"),
]


@pytest.mark.slow
def test_bad_messages_are_rejected_one_by_one_and_the_worker_keeps_serving(
    tmp_path: Path, mosquitto: MosquittoBroker, pg_dsn: str
) -> None:
    proc = _proc(tmp_path, mosquitto, pg_dsn, max_payload_bytes=4096, max_pending_bytes=1024 * 1024).start()
    pub = Publisher(mosquitto)
    now = time.time()
    good = [
        (
            f"edgeguard/v1/{FLEET}/cam-1/results",
            envelope("cam-1", 100 + i, created=now, data=b'{"ok":%d}' % i),
        )
        for i in range(20)
    ]
    try:
        proc.wait_status(lambda s: s["mqtt"]["subscribed"] and s["db"]["connected"], timeout=30)
        # bogus kind: the topic is outside our subscription, so the broker never sends it: 9 rejections
        stream = [(f"edgeguard/v1/{FLEET}/cam-1/{k}", p) for k, p in BAD] + good
        pub.publish_all(stream)
        snap = proc.wait_status(lambda s: s["counters"]["inserted"] >= 20 and s["pending"] == 0)
        assert snap["counters"]["rejected"] == len(BAD) - 1
        assert snap["state"] == "ok"
        assert count(pg_dsn) == 20
        # still serving after all that, and the rejected ones were acknowledged (not redelivered on resume)
        proc.stop()
        proc.start()
        pub.publish_all(
            [(f"edgeguard/v1/{FLEET}/cam-2/results", envelope("cam-2", 1, created=now, data=b"{}"))]
        )
        assert wait_rows(pg_dsn, 21) == 21
        again = proc.wait_status(lambda s: s["counters"]["inserted"] >= 1 and s["pending"] == 0)
        assert again["counters"]["rejected"] == 0
        log = proc.log_tail(20_000)
        assert "result id is not <device>:<seq> of the publishing device" in log
        assert "x" * 100 not in log  # no payload content in the log
    finally:
        pub.close()
        proc.stop()


@pytest.mark.slow
def test_heartbeats_status_and_events_are_stored_once_each(
    tmp_path: Path, mosquitto: MosquittoBroker, pg_dsn: str
) -> None:
    proc = _proc(tmp_path, mosquitto, pg_dsn).start()
    pub = Publisher(mosquitto)
    now = time.time()
    base = f"edgeguard/v1/{FLEET}/cam-3/"
    hb = json.dumps(
        {
            "device": "cam-3",
            "time": now,
            "sequence": 1,
            "latency_ms": {"p50": 4.0, "p99": 9.5},
            "outbox": {"depth": 12, "oldest_age_s": 3.5},
        }
    ).encode()
    event = json.dumps(
        {"kind": "bundle-rejected", "time": now, "device": "cam-3", "reason": "signature"}
    ).encode()
    online = json.dumps({"state": "online", "device": "cam-3", "fleet": FLEET, "time": now}).encode()
    try:
        proc.wait_status(lambda s: s["mqtt"]["subscribed"] and s["db"]["connected"], timeout=30)
        pub.publish_all([(base + "events", event), (base + "events", event), (base + "status", online)])
        # heartbeats are QoS 0 on the device: published at QoS 0 here too, twice (a duplicate anyway)
        pub.publish_all([(base + "heartbeat", hb), (base + "heartbeat", hb)], qos=0)
        assert wait_rows(pg_dsn, 1, table="heartbeats") == 1
        assert wait_rows(pg_dsn, 1, table="events") == 1
        assert wait_rows(pg_dsn, 1, table="device_status") == 1
        proc.wait_status(lambda s: s["counters"]["duplicates"] >= 2 and s["pending"] == 0)
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT device, (body->'outbox'->>'depth')::int, (body->'latency_ms'->>'p99')::float,"
                " extract(epoch from time) FROM edgeguard.heartbeats"
            ).fetchone()
            assert row is not None
            assert row[0] == "cam-3" and row[1] == 12 and row[2] == 9.5 and abs(float(row[3]) - now) < 1e-3
            ev = c.execute("SELECT body->>'kind', body->>'reason' FROM edgeguard.events").fetchone()
            assert ev == ("bundle-rejected", "signature")
        assert count(pg_dsn, "heartbeats") == 1 and count(pg_dsn, "events") == 1
    finally:
        pub.close()
        proc.stop()


@pytest.mark.slow
def test_over_tls_a_burst_larger_than_receive_max_is_stored_exactly_with_bounded_holding(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], pki: Pki, pg_dsn: str
) -> None:
    """TLS to the broker (verified against the fleet CA); 3,000 results at once against receive_max 100: the
    worker never holds more than 100, and every result is stored once (mosquitto sends past Receive Maximum
    after the first acks; the worker stops reading until it has room)."""
    broker = broker_factory(tls=pki)
    proc = _proc(tmp_path, broker, pg_dsn, receive_max=100, batch_max=50).start()
    pub = Publisher(broker)
    now = time.time()
    msgs = [
        (
            f"edgeguard/v1/{FLEET}/cam-{i % 30}/results",
            envelope(f"cam-{i % 30}", i // 30, created=now, data=b"{}"),
        )
        for i in range(3000)
    ]
    try:
        proc.wait_status(lambda s: s["mqtt"]["subscribed"] and s["db"]["connected"], timeout=30)
        pub.publish_all(msgs)
        peak = 0
        deadline = time.monotonic() + 90
        while count(pg_dsn) < len(msgs) and time.monotonic() < deadline:
            snap = proc.status()
            peak = max(peak, snap["pending"] if snap else 0)
            time.sleep(0.02)
        assert count(pg_dsn) == len(msgs)
        done = proc.wait_status(lambda s: s["pending"] == 0 and s["state"] == "ok")
        assert peak <= 100 and done["counters"]["inserted"] == len(msgs)
        assert done["counters"]["full_waits"] > 0  # the bound was reached and held, not just never tested
    finally:
        pub.close()
        proc.stop()


def test_a_database_with_a_newer_schema_stops_the_worker_with_one_line_and_exit_1(
    tmp_path: Path, mosquitto: MosquittoBroker, pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        migrate(c)
        c.execute("INSERT INTO edgeguard.schema_version (version, description) VALUES (99, 'future')")
    proc = _proc(tmp_path, mosquitto, pg_dsn).start()
    assert proc.proc is not None
    assert proc.proc.wait(60) == 1
    tail = proc.log_tail()
    assert tail.rstrip().splitlines()[-1] == (
        f"edgeguard: ingest: database schema is version 99, newer than this EdgeGuard's {SCHEMA_VERSION}"
    )
    assert "Traceback" not in tail
    status = proc.status()
    assert status is not None and status["state"] == "failed"
