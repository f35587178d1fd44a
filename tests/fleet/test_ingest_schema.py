"""Schema, partitions, retention and the two write paths, on the real PostgreSQL (a database per test)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time

import psycopg
import pytest

from edgeguard.fleet.ingest import SCHEMA_VERSION, maintain_partitions, migrate
from edgeguard.fleet.ingest._parse import MessageRow, ResultRow
from edgeguard.fleet.ingest._store import BatchWriter
from tests.fleet._support import REPO

TODAY = dt.date(2026, 11, 29)


def _epoch(day: dt.date, hour: int = 12) -> float:
    return dt.datetime.combine(day, dt.time(hour), dt.timezone.utc).timestamp()


def _result(device: str, seq: int, created: float) -> ResultRow:
    return ResultRow(f"{device}:{seq}", "f", device, seq, "result", False, created, created + 0.5, '{"n":1}')


def _scalar(conn: psycopg.Connection[tuple[object, ...]], query: str) -> object:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def conn(pg_dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    c = psycopg.connect(pg_dsn, autocommit=True)
    migrate(c)
    maintain_partitions(c, today=TODAY, retention_days=3, ahead_days=2)
    yield c  # type: ignore[misc]
    c.close()


def test_migrations_are_versioned_idempotent_and_refuse_a_newer_schema(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    assert migrate(conn) == []
    assert _scalar(conn, "SELECT max(version) FROM edgeguard.schema_version") == SCHEMA_VERSION
    assert _scalar(conn, "SELECT storage FROM edgeguard.schema_settings") == "native"  # no timescaledb here
    kinds = dict(
        conn.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'edgeguard'"
            " AND c.relname IN ('results', 'heartbeats', 'device_status', 'events')"
        ).fetchall()
    )
    assert kinds == dict.fromkeys(("results", "heartbeats", "device_status", "events"), "p")  # partitioned
    conn.execute(
        "INSERT INTO edgeguard.schema_version (version, description) VALUES (%s, 'from the future')",
        (SCHEMA_VERSION + 1,),
    )
    with pytest.raises(RuntimeError, match="newer than this EdgeGuard"):
        migrate(conn)


def test_cli_migrate_creates_the_schema_and_says_so(pg_dsn: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgeguard", "fleet", "ingest", "--migrate", "--fleet", "f", "--dsn", pg_dsn],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("schema: applied [1]; partitions created ")
    again = subprocess.run(
        [sys.executable, "-m", "edgeguard", "fleet", "ingest", "--migrate", "--fleet", "f", "--dsn", pg_dsn],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert again.returncode == 0 and "nothing (up to date)" in again.stdout


def test_cli_migrate_on_an_unreachable_database_is_one_line_exit_2() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeguard",
            "fleet",
            "ingest",
            "--migrate",
            "--fleet",
            "f",
            "--dsn",
            "host=127.0.0.1 port=1 user=postgres password=hunter2 dbname=x connect_timeout=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("edgeguard: database: ") and run.stderr.count("\n") == 1
    assert "hunter2" not in run.stderr + run.stdout


def test_rows_go_to_their_day_and_retention_drops_whole_old_days(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    w = BatchWriter(conn)
    w.write([_result("cam", 1, _epoch(TODAY)), _result("cam", 2, _epoch(TODAY - dt.timedelta(days=3)))], [])
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results_p20261129") == 1
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results_p20261126") == 1
    # Three days later with the same retention, the 26th is older than the window: its partition is dropped.
    m = maintain_partitions(conn, today=TODAY + dt.timedelta(days=3), retention_days=3, ahead_days=2)
    assert "results_p20261126" in m.dropped and "results_p20261204" in m.created
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results") == 1


def test_far_off_device_clocks_land_in_the_default_partition_and_move_when_their_day_is_created(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    future = TODAY + dt.timedelta(days=10)
    w = BatchWriter(conn)
    w.write([_result("cam", 1, _epoch(future))], [])
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results_default") == 1
    m = maintain_partitions(conn, today=future, retention_days=3, ahead_days=2)
    assert m.moved_from_default == 1
    assert _scalar(conn, f"SELECT count(*) FROM edgeguard.results_p{future:%Y%m%d}") == 1
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results_default") == 0
    # and the key still deduplicates after the move
    assert w.write([_result("cam", 1, _epoch(future))], []).duplicates == 1


def test_default_partition_rows_older_than_retention_are_deleted(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    old = TODAY - dt.timedelta(days=40)
    BatchWriter(conn).write([_result("cam", 1, _epoch(old))], [])
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results_default") == 1
    m = maintain_partitions(conn, today=TODAY, retention_days=3, ahead_days=2)
    assert m.deleted_from_default == 1
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results") == 0


@pytest.mark.parametrize("method", ["copy", "values"])
def test_both_write_methods_store_each_id_once_even_within_one_batch(
    conn: psycopg.Connection[tuple[object, ...]], method: str
) -> None:
    w = BatchWriter(conn, method=method)
    t = _epoch(TODAY)
    rows = [_result(f"cam-{d}", s, t + s) for d in range(3) for s in range(1500)]  # > one VALUES chunk
    hb = MessageRow("heartbeats", "abc", "f", "cam-0", t, t, '{"sequence":1}')
    first = w.write(rows + rows[:10], [hb, hb])
    assert (first.inserted, first.duplicates) == (len(rows) + 1, 11)
    again = w.write(rows[:100], [hb])
    assert (again.inserted, again.duplicates) == (0, 101)
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results") == len(rows)
    assert _scalar(conn, "SELECT count(DISTINCT result_id) FROM edgeguard.results") == len(rows)
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.heartbeats") == 1
    assert _scalar(conn, "SELECT data->>'n' FROM edgeguard.results LIMIT 1") == "1"


def test_a_failed_batch_commits_nothing(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    w = BatchWriter(conn)
    t = _epoch(TODAY)
    bad = ResultRow("cam:2", "f", "cam", 2, "result", False, t, t, "{not json")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        w.write([_result("cam", 1, t), bad], [])
    assert _scalar(conn, "SELECT count(*) FROM edgeguard.results") == 0
    assert w.write([_result("cam", 1, t)], []).inserted == 1  # the connection and temp table still work


def _grafana_sql(text: str) -> str:
    """The dashboard's SQL with Grafana's macros and variables expanded the way Grafana does."""
    text = re.sub(
        r"\$__timeGroupAlias\((\w+), '(\d+)m'\)",
        lambda m: (
            f"to_timestamp(floor(extract(epoch from {m[1]}) / {int(m[2]) * 60}) * {int(m[2]) * 60}) AS time"
        ),
        text,
    )
    text = re.sub(
        r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '2 days' AND now() + interval '1 day'", text
    )
    return text.replace("'$fleet'", "'f'").replace("($device)", "('cam-1')").replace("($event_kind)", "('x')")


def test_every_grafana_query_runs_on_the_schema_and_finds_the_rows(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    dash = json.loads((REPO / "examples" / "grafana-ingest-dashboard.json").read_text())
    t = time.time()
    hb = MessageRow(
        "heartbeats", "h1", "f", "cam-1", t, t, '{"latency_ms":{"p50":4.0,"p99":9.0},"outbox":{"depth":3}}'
    )
    ev = MessageRow("events", "e1", "f", "cam-1", t, t, '{"kind":"x","reason":"signature"}')
    st = MessageRow("device_status", "s1", "f", "cam-1", t, t, '{"state":"online"}')
    res = ResultRow("cam-1:1", "f", "cam-1", 1, "result", False, t, t, '{"latency_ms":4.5}')
    maintain_partitions(conn, today=dt.datetime.now(dt.timezone.utc).date(), retention_days=3, ahead_days=2)
    BatchWriter(conn).write([res], [hb, ev, st])
    queries = [tg["rawSql"] for p in dash["panels"] for tg in p["targets"]]
    queries += [v["query"] for v in dash["templating"]["list"]]
    assert len(queries) == 9
    for q in queries:
        rows = conn.execute(_grafana_sql(q).encode()).fetchall()
        assert rows, q  # each panel shows the row written above
