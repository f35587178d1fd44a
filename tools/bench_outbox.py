"""Benchmark: durable outbox enqueue vs raw sqlite3, and start-up with a large backlog.

    python tools/bench_outbox.py [--results 20000] [--producers 64] [--backlog 1000000] [--payload 200]

1. Durable enqueue. EdgeGuard: ``--producers`` threads each calling ``Outbox.put()`` (each call returns
   only once its result is committed with an fsync: group commit batches concurrent callers), and one thread
   calling ``put_many()`` with batches of 64. Raw: the same number of rows of the same size inserted with
   plain ``sqlite3`` (WAL, ``synchronous=FULL``, one commit per batch of 64 rows, no encryption, no counters,
   no index). Both write to the same directory; runs are interleaved, the median of ``--reps`` is reported
   as a ratio.
2. Start-up: an outbox holding ``--backlog`` results is closed, then reopened; we time opening until the first
   ``put()`` returned and the first ``peek()`` (what the link publishes first) came back.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

from edgeguard.outbox import Outbox, OutboxConfig

KEY = bytes(range(32))


def payload(i: int, size: int) -> bytes:
    body = json.dumps({"i": i, "label": "person", "score": 0.87, "box": [12, 40, 200, 310]})
    return (body[:-1] + ',"pad":"' + "x" * max(0, size - len(body) - 10) + '"}').encode()


def bench_raw(directory: Path, rows: list[bytes], batch: int) -> float:
    path = directory / "raw.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute(
        "CREATE TABLE results (seq INTEGER PRIMARY KEY, priority INTEGER, kind TEXT, created REAL,"
        " expires REAL, size INTEGER, blob BLOB)"
    )
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        now = time.time()
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO results VALUES (?,?,?,?,?,?,?)",
            [(start + i, 0, "result", now, 1e300, len(p), p) for i, p in enumerate(chunk)],
        )
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    con.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return len(rows) / elapsed


def bench_put_threads(directory: Path, rows: list[bytes], producers: int) -> float:
    path = directory / "eg.db"
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=OutboxConfig(max_count=10_000_000))
    per = len(rows) // producers
    barrier = threading.Barrier(producers + 1)

    def work(k: int) -> None:
        mine = rows[k * per : (k + 1) * per]
        barrier.wait()
        for p in mine:
            ob.put(p)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ob.close()
    _remove(path)
    return per * producers / elapsed


def bench_put_many(directory: Path, rows: list[bytes], batch: int) -> float:
    path = directory / "egm.db"
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=OutboxConfig(max_count=10_000_000))
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        ob.put_many(rows[start : start + batch])
    elapsed = time.perf_counter() - t0
    ob.close()
    _remove(path)
    return len(rows) / elapsed


def _remove(path: Path) -> None:
    for p in path.parent.iterdir():
        if p.name.startswith(path.name):
            p.unlink()


def bench_startup(directory: Path, backlog: int, size: int) -> dict[str, float]:
    path = directory / "backlog.db"
    cfg = OutboxConfig(max_count=max(backlog + 10, 1000), max_bytes=1 << 36)
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=cfg)
    t0 = time.perf_counter()
    body = payload(0, size)
    for start in range(0, backlog, 5000):
        ob.put_many([body] * min(5000, backlog - start))
    fill = time.perf_counter() - t0
    ob.close()
    db_mb = sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("backlog.db")) / 1e6
    t0 = time.perf_counter()
    ob = Outbox(path=path, storage_key=KEY, device_id="bench", config=cfg)
    opened = time.perf_counter() - t0
    ob.put(body)
    accepted = time.perf_counter() - t0
    first = ob.peek(after=-1, limit=20)
    ready = time.perf_counter() - t0
    depth = ob.stats().depth
    ob.close()
    _remove(path)
    assert first and depth == backlog + 1, (len(first), depth)
    return {"fill_s": fill, "db_mb": db_mb, "open_s": opened, "first_put_s": accepted, "ready_s": ready}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=20_000)
    ap.add_argument("--producers", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--payload", type=int, default=200, help="bytes per result")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backlog", type=int, default=1_000_000, help="0 skips the start-up measurement")
    ap.add_argument("--dir", type=Path, default=None, help="where the databases go (default: a temp dir)")
    args = ap.parse_args()

    rows = [payload(i, args.payload) for i in range(args.results)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        raw, eg, egm = [], [], []
        for _ in range(args.reps):
            raw.append(bench_raw(d, rows, args.batch))
            eg.append(bench_put_threads(d, rows, args.producers))
            egm.append(bench_put_many(d, rows, args.batch))
        r, e, m = statistics.median(raw), statistics.median(eg), statistics.median(egm)
        n, size = args.results, args.payload
        print(f"durable enqueue, {n} results of {size} B, fsync per commit, median of {args.reps}")
        label = f"sqlite3, batches of {args.batch}:"
        print(f"  raw       {label:32s}{r:10.0f} results/s")
        label = f"put(), {args.producers} threads:"
        print(f"  EdgeGuard {label:32s}{e:10.0f} results/s   ratio {e / r:.2f}x")
        label = f"put_many({args.batch}), 1 thread:"
        print(f"  EdgeGuard {label:32s}{m:10.0f} results/s   ratio {m / r:.2f}x")
        if args.backlog:
            s = bench_startup(d, args.backlog, args.payload)
            mb, fill = s["db_mb"], s["fill_s"]
            print(f"start-up with {args.backlog} queued results ({mb:.0f} MB, filled in {fill:.0f} s)")
            print(
                f"  open {s['open_s'] * 1e3:.1f} ms, first put() durable {s['first_put_s'] * 1e3:.1f} ms, "
                f"first results ready to publish {s['ready_s'] * 1e3:.1f} ms"
            )
    print(f"(machine: {os.cpu_count()} CPUs; figures are noisy on a shared machine: compare the ratios)")


if __name__ == "__main__":
    main()
