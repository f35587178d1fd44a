"""Benchmark: `edgeguard fleet ingest` into PostgreSQL.

    python tools/bench_ingest.py [--rows 100000] [--devices 1000] [--rate 2000] [--outage-s 30]
                                 [--pg "host=127.0.0.1 user=postgres dbname=postgres"]

Creates its own databases (random names, dropped at the end) on ``--pg`` and starts its own mosquitto on a
free local port.

1. Write rate. The same ``--rows`` result rows (``--devices`` devices) are written by the ingest's BatchWriter
   in batches of ``--batch`` (one transaction each, ON CONFLICT DO NOTHING), once with ``copy`` (COPY into a
   temporary table + INSERT … SELECT) and once with ``values`` (multi-row INSERT), each into a fresh database;
   the reference is a raw ``COPY edgeguard.results FROM STDIN`` of the same rows in the same batch size into
   the same schema (same partitions and indexes, no deduplication), its rows converted before timing starts.
   Median of ``--reps``, interleaved; ratio of rates.
2. End-to-end lag. A real ingest worker (in this process) behind mosquitto; a paho publisher sends results for
   ``--devices`` devices at ``--rate`` results/s for ``--seconds``, each created at its publish time. Lag per
   row = time its batch's COMMIT returned - the result's created time; p50 / p99 / max.
3. Catch-up. The same stream; the worker reaches PostgreSQL through a local TCP proxy that is cut for
   ``--outage-s`` seconds mid-stream and restored; catch-up = time from restore until every published result
   is committed (and the worker holds nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import select
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.fleet.ingest import IngestWorker, maintain_partitions, migrate
from edgeguard.fleet.ingest._config import build_config
from edgeguard.fleet.ingest._parse import ResultRow
from edgeguard.fleet.ingest._store import RESULT_COLUMNS, BatchWriter

FLEET = "bench"
_ENVELOPE = b'{"id":"%s:%d","seq":%d,"kind":"result","priority":false,"created":%r,"data":%s}'


# ----------------------------------------------------------------------------------------------- fixtures
@contextlib.contextmanager
def database(admin_dsn: str) -> Iterator[str]:
    name = f"eg_bench_{secrets.token_hex(5)}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto(binary: str) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "max_queued_messages 0",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                time.sleep(0.02)
            yield port
        finally:
            proc.kill()
            proc.wait()


class Proxy:
    """TCP forwarder to PostgreSQL: ``cut()`` closes every connection and refuses new ones until reopened."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.open = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            if not self.open:
                a.close()
                continue
            b = socket.create_connection(self.target)
            self.conns += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                for s in select.select([a, b], [], [], 0.5)[0]:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)

    def cut(self) -> None:
        self.open = False
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()
        self.conns = []


def rows(n: int, devices: int) -> list[ResultRow]:
    now = time.time()
    return [
        ResultRow(
            f"cam-{i % devices:04d}:{i // devices}",
            FLEET,
            f"cam-{i % devices:04d}",
            i // devices,
            "result",
            False,
            now + i * 1e-4,
            now + i * 1e-4 + 0.05,
            '{"label":"person","score":0.91,"box":[12,40,200,310],"latency_ms":4.5}',
        )
        for i in range(n)
    ]


def prepared(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(dsn, autocommit=True)
    migrate(conn)
    maintain_partitions(conn, today=dt.datetime.now(dt.timezone.utc).date(), retention_days=2, ahead_days=2)
    return conn


# -------------------------------------------------------------------------------------------- 1. write rate
def write_rate(admin: str, data: list[ResultRow], batch: int, method: str) -> float:
    # The raw baseline gets its rows ready-made (timestamps already converted) before the clock starts: the
    # most favourable raw COPY, so the ratio is not flattered by the baseline's own Python work.
    ready = (
        [
            (
                r.result_id,
                r.fleet,
                r.device,
                r.seq,
                r.kind,
                r.priority,
                dt.datetime.fromtimestamp(r.created, dt.timezone.utc),
                dt.datetime.fromtimestamp(r.received, dt.timezone.utc),
                r.data,
            )
            for r in data
        ]
        if method == "raw-copy"
        else []
    )
    with database(admin) as dsn, prepared(dsn) as conn:
        t0 = time.perf_counter()
        if method == "raw-copy":
            for i in range(0, len(ready), batch):
                with (
                    conn.transaction(),
                    conn.cursor().copy(
                        f"COPY edgeguard.results ({', '.join(RESULT_COLUMNS)}) FROM STDIN".encode()
                    ) as cp,
                ):
                    for row in ready[i : i + batch]:
                        cp.write_row(row)
        else:
            w = BatchWriter(conn, method=method)
            for i in range(0, len(data), batch):
                w.write(data[i : i + batch], [])
        elapsed = time.perf_counter() - t0
        got = conn.execute("SELECT count(*) FROM edgeguard.results").fetchone()
        assert got is not None and got[0] == len(data), got
    return len(data) / elapsed


# ------------------------------------------------------------------------------------- 2./3. live streams
class Stream:
    """A paho publisher sending results for ``devices`` devices at ``rate`` per second (created = now)."""

    def __init__(self, port: int, devices: int, rate: float) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.devices, self.rate = devices, rate
        self.sent = 0

    def run_for(self, seconds: float) -> None:
        t0 = time.monotonic()
        base = self.sent
        while (elapsed := time.monotonic() - t0) < seconds:
            due = base + int(elapsed * self.rate)
            while self.sent < due:
                dev = self.sent % self.devices
                seq = self.sent // self.devices
                name = f"cam-{dev:04d}".encode()
                payload = _ENVELOPE % (name, seq, seq, time.time(), b'{"label":"person","score":0.9}')
                self.client.publish(f"edgeguard/v1/{FLEET}/cam-{dev:04d}/results", payload, qos=1)
                self.sent += 1
            time.sleep(0.002)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_worker(dsn: str, port: int, lags: list[float]) -> IngestWorker:
    cfg = build_config(
        {
            "fleet": FLEET,
            "dsn": dsn,
            "client_id": f"bench-{secrets.token_hex(3)}",
            "flush_interval_s": 0.05,
            "retention_days": 2,
            "partitions_ahead_days": 1,
            "db_retry_initial_s": 0.1,
            "db_retry_max_s": 1.0,
            "db_connect_timeout_s": 2,
        },
        broker_port=port,
    )
    worker = IngestWorker(cfg)
    original = worker._committed

    def timed(batch: list[object], written: object, results: list[ResultRow]) -> None:
        original(batch, written, results)  # type: ignore[arg-type]
        now = time.time()
        lags.extend(now - r.created for r in results)

    worker._committed = timed  # type: ignore[assignment,method-assign]
    worker.start()
    deadline = time.monotonic() + 60
    while not (worker.status()["db"]["connected"] and worker.status()["mqtt"]["subscribed"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker not ready: {worker.status()}")
        time.sleep(0.05)
    return worker


def committed(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM edgeguard.results").fetchone()
        return int(str(row[0])) if row is not None else 0


def wait_all(dsn: str, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while committed(dsn) < n:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {committed(dsn)} of {n} committed after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2000.0, help="results per second, all devices together")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: rate,lag,outage")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    report: dict[str, object] = {}

    if "rate" not in skip:
        data = rows(args.rows, args.devices)
        rates: dict[str, list[float]] = {"raw-copy": [], "copy": [], "values": []}
        for _ in range(args.reps):  # interleaved, so machine noise hits all three alike
            for method, got in rates.items():
                got.append(write_rate(args.pg, data, args.batch, method))
        med = {m: statistics.median(v) for m, v in rates.items()}
        report["write_rows_per_s"] = {m: round(v) for m, v in med.items()}
        report["ratio_copy_vs_raw"] = round(med["copy"] / med["raw-copy"], 3)
        report["ratio_values_vs_raw"] = round(med["values"] / med["raw-copy"], 3)
        print(json.dumps({"write": report}), flush=True)

    if "lag" not in skip:
        with mosquitto(args.mosquitto) as port, database(args.pg) as dsn:
            lags: list[float] = []
            worker = start_worker(dsn, port, lags)
            stream = Stream(port, args.devices, args.rate)
            stream.run_for(args.seconds)
            wait_all(dsn, stream.sent, 120)
            stream.close()
            worker.stop()
            report["lag"] = {
                "devices": args.devices,
                "rate_per_s": args.rate,
                "results": stream.sent,
                "p50_ms": round(pct(lags, 0.5) * 1000, 1),
                "p99_ms": round(pct(lags, 0.99) * 1000, 1),
                "max_ms": round(max(lags) * 1000, 1),
            }
            print(json.dumps({"lag": report["lag"]}), flush=True)

    if "outage" not in skip:
        with mosquitto(args.mosquitto) as port, database(args.pg) as dsn:
            info = psycopg.conninfo.conninfo_to_dict(dsn)
            proxy = Proxy((str(info.get("host", "127.0.0.1")), int(str(info.get("port", 5432)))))
            via = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))
            lags = []
            worker = start_worker(via, port, lags)
            stream = Stream(port, args.devices, args.rate)
            stream.run_for(3.0)
            proxy.cut()
            stream.run_for(args.outage_s)
            backlog = stream.sent - committed(dsn)
            peak_pending = worker.status()["pending"]
            proxy.open = True
            t0 = time.monotonic()
            catch_up = wait_all(dsn, stream.sent, 600)
            while worker.status()["pending"]:
                time.sleep(0.02)
            drained = time.monotonic() - t0
            stream.close()
            worker.stop()
            report["outage"] = {
                "outage_s": args.outage_s,
                "rate_per_s": args.rate,
                "backlog": backlog,
                "worker_pending_during_outage": peak_pending,
                "catch_up_s": round(catch_up, 2),
                "drained_s": round(drained, 2),
            }
            print(json.dumps({"outage": report["outage"]}), flush=True)


if __name__ == "__main__":
    main()
