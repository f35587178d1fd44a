"""Batch writes: one transaction per batch, duplicates dropped by the primary key.

Two ways to get a batch in, measured by tools/bench_ingest.py (docs/ingest.md has the figures):

- ``copy``: COPY the rows into a temporary table (ON COMMIT DELETE ROWS, created once per connection), then
  ``INSERT INTO … SELECT … FROM tmp ON CONFLICT DO NOTHING``;
- ``values``: multi-row ``INSERT … VALUES (…), (…) … ON CONFLICT DO NOTHING`` in chunks.

``ON CONFLICT DO NOTHING`` also absorbs a duplicate inside the same statement (a redelivered copy in the same
batch), so the row count after any mix of retries is the number of distinct ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from edgeguard.fleet.ingest._parse import MessageRow, ResultRow

__all__ = ["BatchWriter", "Written", "RESULT_COLUMNS", "MESSAGE_COLUMNS"]

RESULT_COLUMNS = ("result_id", "fleet", "device", "seq", "kind", "priority", "created", "received", "data")
MESSAGE_COLUMNS = ("msg_id", "fleet", "device", "time", "received", "body")
_VALUES_CHUNK = 1000  # rows per INSERT … VALUES statement (9 parameters each, far below the 65535 limit)


@dataclass
class Written:
    inserted: int = 0
    duplicates: int = 0


def _result_tuple(r: ResultRow) -> tuple[object, ...]:
    return (r.result_id, r.fleet, r.device, r.seq, r.kind, r.priority, r.created, r.received, r.data)


def _message_tuple(m: MessageRow) -> tuple[object, ...]:
    return (m.msg_id, m.fleet, m.device, m.time, m.received, m.body)


class BatchWriter:
    """Writes batches on one connection (owned by the caller). Not thread-safe: the writer thread's alone."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], *, method: str = "copy") -> None:
        if method not in ("copy", "values"):
            raise ValueError(f"unknown write method {method!r}")
        self.conn = conn
        self.method = method
        self._temp_ready = False

    def _ensure_temp(self) -> None:
        if self._temp_ready:
            return
        if not self.conn.autocommit:
            raise ValueError("BatchWriter needs an autocommit connection (each batch is its own transaction)")
        # Epoch seconds travel as double precision and become timestamptz in the INSERT … SELECT: the same
        # float always gives the same timestamptz, which keeps (id, created) a deduplicating key.
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ingest_results_tmp (result_id text, fleet text, device text,"
            " seq bigint, kind text, priority boolean, created double precision, received double precision,"
            " data jsonb) ON COMMIT DELETE ROWS"
        )
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ingest_messages_tmp (tbl text, msg_id text, fleet text,"
            " device text, time double precision, received double precision, body jsonb)"
            " ON COMMIT DELETE ROWS"
        )
        self._temp_ready = True

    def write(self, results: Sequence[ResultRow], messages: Sequence[MessageRow]) -> Written:
        """Insert the rows in one transaction and commit; raises psycopg errors (the caller classifies)."""
        out = Written()
        if self.method == "copy":
            # Before the batch's transaction, committed on its own: created inside it, a failed batch would
            # roll the tables back while this writer believes they exist.
            self._ensure_temp()
        with self.conn.transaction():
            if self.method == "copy":
                self._copy(results, messages, out)
            else:
                self._values(results, messages, out)
        return out

    # -------------------------------------------------------------------------------------------- COPY path
    def _copy(self, results: Sequence[ResultRow], messages: Sequence[MessageRow], out: Written) -> None:
        cur = self.conn.cursor()
        if results:
            with cur.copy(
                "COPY ingest_results_tmp (result_id, fleet, device, seq, kind, priority, created, received,"
                " data) FROM STDIN"
            ) as cp:
                for r in results:
                    cp.write_row(_result_tuple(r))
            cur.execute(
                "INSERT INTO edgeguard.results (result_id, fleet, device, seq, kind, priority, created,"
                " received, data) SELECT result_id, fleet, device, seq, kind, priority,"
                " to_timestamp(created), to_timestamp(received), data FROM ingest_results_tmp"
                " ON CONFLICT DO NOTHING"
            )
            out.inserted += max(cur.rowcount, 0)
            out.duplicates += len(results) - max(cur.rowcount, 0)
        if messages:
            with cur.copy(
                "COPY ingest_messages_tmp (tbl, msg_id, fleet, device, time, received, body) FROM STDIN"
            ) as cp:
                for m in messages:
                    cp.write_row((m.table, *_message_tuple(m)))
            for table in sorted({m.table for m in messages}):
                cur.execute(
                    sql.SQL(
                        "INSERT INTO edgeguard.{} (msg_id, fleet, device, time, received, body)"
                        " SELECT msg_id, fleet, device, to_timestamp(time), to_timestamp(received), body"
                        " FROM ingest_messages_tmp WHERE tbl = %s ON CONFLICT DO NOTHING"
                    ).format(sql.Identifier(table)),
                    (table,),
                )
                n = sum(1 for m in messages if m.table == table)
                out.inserted += max(cur.rowcount, 0)
                out.duplicates += n - max(cur.rowcount, 0)

    # ------------------------------------------------------------------------------------------ VALUES path
    def _values(self, results: Sequence[ResultRow], messages: Sequence[MessageRow], out: Written) -> None:
        cur = self.conn.cursor()
        one_result = sql.SQL("(%s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), %s::jsonb)")
        for i in range(0, len(results), _VALUES_CHUNK):
            chunk = results[i : i + _VALUES_CHUNK]
            stmt = sql.SQL(
                "INSERT INTO edgeguard.results (result_id, fleet, device, seq, kind, priority, created,"
                " received, data) VALUES {} ON CONFLICT DO NOTHING"
            ).format(sql.SQL(", ").join([one_result] * len(chunk)))
            cur.execute(stmt, [v for r in chunk for v in _result_tuple(r)])
            out.inserted += max(cur.rowcount, 0)
            out.duplicates += len(chunk) - max(cur.rowcount, 0)
        one_msg = sql.SQL("(%s, %s, %s, to_timestamp(%s), to_timestamp(%s), %s::jsonb)")
        for table in sorted({m.table for m in messages}):
            rows = [m for m in messages if m.table == table]
            for i in range(0, len(rows), _VALUES_CHUNK):
                part = rows[i : i + _VALUES_CHUNK]
                stmt = sql.SQL(
                    "INSERT INTO edgeguard.{} (msg_id, fleet, device, time, received, body) VALUES {}"
                    " ON CONFLICT DO NOTHING"
                ).format(sql.Identifier(table), sql.SQL(", ").join([one_msg] * len(part)))
                cur.execute(stmt, [v for m in part for v in _message_tuple(m)])
                out.inserted += max(cur.rowcount, 0)
                out.duplicates += len(part) - max(cur.rowcount, 0)
