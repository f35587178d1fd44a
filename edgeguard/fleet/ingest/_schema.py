"""The database schema: versioned migrations, daily partitions created ahead, retention.

Everything lives in the PostgreSQL schema ``edgeguard``. ``edgeguard.schema_version`` records each applied
migration; migrations and partition maintenance run under one transaction-scoped advisory lock, so several
workers starting together apply each step once.

Tables are range-partitioned by the *device's* time (``created`` for results, ``time`` for the others), not by
the time received: the primary key of a partitioned table must contain the partition column, and only a
column that is identical in every redelivered copy keeps ``(id, time)`` a key that deduplicates. A default
partition takes rows outside the created range (a device clock far off); when a partition is created later
for a range that already has rows in the default one, those rows are moved into it in the same transaction.

Where the TimescaleDB extension is available, the same tables are hypertables instead (chunks of one day) and
retention drops chunks; partitions are then Timescale's business.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

__all__ = [
    "SCHEMA_VERSION",
    "PARTITIONED",
    "migrate",
    "maintain_partitions",
    "Maintenance",
    "timescale_in_use",
]

log = logging.getLogger("edgeguard.fleet.ingest")

_LOCK_KEY = 0x45444745_494E4753 & 0x7FFFFFFFFFFFFFFF  # pg_advisory_xact_lock key: "EDGEINGS"
# table -> the device-time column it is partitioned by
PARTITIONED: dict[str, str] = {
    "results": "created",
    "heartbeats": "time",
    "device_status": "time",
    "events": "time",
}

_MESSAGE_TABLE = """
CREATE TABLE edgeguard.{table} (
    msg_id    text        NOT NULL,
    fleet     text        NOT NULL,
    device    text        NOT NULL,
    time      timestamptz NOT NULL,
    received  timestamptz NOT NULL,
    body      jsonb       NOT NULL,
    PRIMARY KEY (msg_id, time)
)__PARTITION_{table}__;
CREATE INDEX {table}_device_time ON edgeguard.{table} (fleet, device, time DESC);
"""

_V1_TABLES = (
    """
CREATE TABLE edgeguard.results (
    result_id text        NOT NULL,
    fleet     text        NOT NULL,
    device    text        NOT NULL,
    seq       bigint      NOT NULL,
    kind      text        NOT NULL,
    priority  boolean     NOT NULL,
    created   timestamptz NOT NULL,
    received  timestamptz NOT NULL,
    data      jsonb       NOT NULL,
    PRIMARY KEY (result_id, created)
)__PARTITION_results__;
-- "what did camera 7 detect last night?": one device, a time range
CREATE INDEX results_device_created ON edgeguard.results (fleet, device, created DESC);
"""
    + _MESSAGE_TABLE.replace("{table}", "heartbeats")
    + _MESSAGE_TABLE.replace("{table}", "device_status")
    + _MESSAGE_TABLE.replace("{table}", "events")
    + """
-- "show every security event of site B": events by kind over a fleet and a time range
CREATE INDEX events_kind_time ON edgeguard.events (fleet, (body->>'kind'), time DESC);
"""
)

# (version, description, SQL). Append only: a released migration is never edited.
_MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "results, heartbeats, device_status, events (time-partitioned)", _V1_TABLES),
]
SCHEMA_VERSION = _MIGRATIONS[-1][0]


def _timescale_available(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    return row is not None


def timescale_in_use(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT storage FROM edgeguard.schema_settings WHERE id = 1").fetchone()
    return row is not None and row[0] == "timescaledb"


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction; returns the versions applied.
    Refuses (RuntimeError) a database migrated by a newer EdgeGuard."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS edgeguard")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS edgeguard.schema_version ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS edgeguard.schema_settings ("
            " id integer PRIMARY KEY CHECK (id = 1), storage text NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM edgeguard.schema_version").fetchone()
        current = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema is version {current}, newer than this EdgeGuard's {SCHEMA_VERSION}"
            )
        settings = conn.execute("SELECT storage FROM edgeguard.schema_settings WHERE id = 1").fetchone()
        if settings is None:
            storage = "timescaledb" if _timescale_available(conn) else "native"
            conn.execute("INSERT INTO edgeguard.schema_settings (id, storage) VALUES (1, %s)", (storage,))
        else:
            storage = str(settings[0])
        for version, description, body in _MIGRATIONS:
            if version <= current:
                continue
            _apply(conn, version, body, storage)
            conn.execute(
                "INSERT INTO edgeguard.schema_version (version, description) VALUES (%s, %s)",
                (version, description),
            )
            applied.append(version)
            log.info("ingest: applied schema migration %d (%s)", version, description)
    return applied


def _apply(conn: psycopg.Connection[tuple[object, ...]], version: int, body: str, storage: str) -> None:
    timescale = storage == "timescaledb"
    text = body
    for table, column in PARTITIONED.items():
        text = text.replace(f"__PARTITION_{table}__", "" if timescale else f" PARTITION BY RANGE ({column})")
    if timescale:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    conn.execute(text.encode())
    if version != 1:
        return
    for table, column in PARTITIONED.items():
        if timescale:
            conn.execute(
                "SELECT create_hypertable(%s, %s, chunk_time_interval => interval '1 day')",
                (f"edgeguard.{table}", column),
            )
        else:
            conn.execute(
                sql.SQL("CREATE TABLE edgeguard.{} PARTITION OF edgeguard.{} DEFAULT").format(
                    sql.Identifier(f"{table}_default"), sql.Identifier(table)
                )
            )


@dataclass(frozen=True)
class Maintenance:
    created: list[str]
    dropped: list[str]
    moved_from_default: int
    deleted_from_default: int


_PART_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")


def maintain_partitions(
    conn: psycopg.Connection[tuple[object, ...]],
    *,
    today: dt.date,
    retention_days: int,
    ahead_days: int,
) -> Maintenance:
    """Create the daily partitions from ``today - retention_days`` to ``today + ahead_days`` and drop those
    wholly older than the retention window (rows older than it in the default partition are deleted too).
    One transaction under the migration lock; ``today`` is a parameter so tests control the calendar."""
    created: list[str] = []
    dropped: list[str] = []
    moved = deleted = 0
    oldest = today - dt.timedelta(days=retention_days)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        cutoff = dt.datetime.combine(oldest, dt.time(), dt.timezone.utc)
        if timescale_in_use(conn):
            for table in PARTITIONED:
                conn.execute("SELECT drop_chunks(%s, older_than => %s)", (f"edgeguard.{table}", cutoff))
            return Maintenance([], [], 0, 0)
        existing = {
            str(r[0])
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
                " WHERE n.nspname = 'edgeguard'"
            ).fetchall()
        }
        for table, column in PARTITIONED.items():
            for name in sorted(existing):
                m = _PART_NAME.fullmatch(name)
                if m is None or m["table"] != table:
                    continue
                day = dt.datetime.strptime(m["day"], "%Y%m%d").date()
                if day < oldest:
                    conn.execute(sql.SQL("DROP TABLE edgeguard.{}").format(sql.Identifier(name)))
                    dropped.append(name)
            cur = conn.execute(
                sql.SQL("DELETE FROM edgeguard.{} WHERE {} < %s").format(
                    sql.Identifier(f"{table}_default"), sql.Identifier(column)
                ),
                (cutoff,),
            )
            deleted += max(cur.rowcount, 0)
            day = oldest
            while day <= today + dt.timedelta(days=ahead_days):
                name = f"{table}_p{day:%Y%m%d}"
                if name not in existing:
                    moved += _create_partition(conn, table, column, name, day)
                    created.append(name)
                day += dt.timedelta(days=1)
    if created or dropped:
        log.info("ingest: partitions created %d, dropped %d", len(created), len(dropped))
    return Maintenance(created, dropped, moved, deleted)


def _create_partition(
    conn: psycopg.Connection[tuple[object, ...]], table: str, column: str, name: str, day: dt.date
) -> int:
    lo = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    hi = lo + dt.timedelta(days=1)
    ident, parent, default = (sql.Identifier(n) for n in (name, table, f"{table}_default"))
    col = sql.Identifier(column)
    # Created detached, filled with the default partition's rows of its range, then attached: ATTACH checks
    # that the default partition holds no row of the new range, and this transaction just moved them.
    conn.execute(
        sql.SQL(
            "CREATE TABLE edgeguard.{} (LIKE edgeguard.{} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        ).format(ident, parent)
    )
    cur = conn.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM edgeguard.{} WHERE {} >= %s AND {} < %s RETURNING *)"
            " INSERT INTO edgeguard.{} SELECT * FROM moved"
        ).format(default, col, col, ident),
        (lo, hi),
    )
    conn.execute(
        # DDL takes no bind parameters: the bounds are literals (our own datetimes, quoted by psycopg)
        sql.SQL("ALTER TABLE edgeguard.{} ATTACH PARTITION edgeguard.{} FOR VALUES FROM ({}) TO ({})").format(
            parent, ident, sql.Literal(lo), sql.Literal(hi)
        )
    )
    return max(cur.rowcount, 0)
