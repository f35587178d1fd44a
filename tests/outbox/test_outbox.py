"""The outbox on a real SQLite file: durability, order, ids, bounds and drops, TTL, encryption at rest."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeguard.errors import ConfigError, OutboxError
from edgeguard.outbox import Outbox, OutboxConfig

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, clock: Clock | None = None, **cfg: object) -> Outbox:
    return Outbox(
        path=tmp_path / "outbox.db",
        storage_key=KEY,
        device_id="dev-1",
        config=OutboxConfig(**cfg),  # type: ignore[arg-type]
        now=clock or Clock(),
    )


def all_items(ob: Outbox) -> list[tuple[str, bytes]]:
    return [(i.id, i.payload) for i in ob.peek(after=-1, limit=1_000_000)]


def test_put_returns_ids_in_order_and_peek_decrypts(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ids = [ob.put(b'{"n":%d}' % i) for i in range(5)] + ob.put_many([b'{"m":1}', b'{"m":2}'])
        assert ids == [f"dev-1:{i}" for i in range(7)]
        items = ob.peek(after=-1, limit=100)
        assert [i.id for i in items] == ids
        assert items[0].payload == b'{"n":0}' and items[-1].payload == b'{"m":2}'
        assert [i.id for i in ob.peek(after=4, limit=1)] == ["dev-1:5"]
        ob.ack([0, 1, 2])
        assert ob.wait_idle()
        assert ob.stats().depth == 4
        assert [i.seq for i in ob.peek(after=-1, limit=100)] == [3, 4, 5, 6]


def test_reopen_keeps_results_and_ids_never_reused(tmp_path: Path) -> None:
    ob = make(tmp_path)
    ob.put_many([b"{}"] * 3)
    ob.close()
    ob = make(tmp_path)
    assert ob.stats().depth == 3
    assert ob.put(b"{}") == "dev-1:3"  # clean stop: continues without a gap
    ob.close()


def test_concurrent_producers_get_unique_ordered_ids(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        got: list[list[str]] = [[] for _ in range(8)]

        def work(k: int) -> None:
            for i in range(100):
                got[k].append(ob.put(json.dumps({"k": k, "i": i}).encode()))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flat = [x for g in got for x in g]
        assert len(set(flat)) == 800
        for g in got:  # each producer's results keep its order
            assert [int(x.split(":")[1]) for x in g] == sorted(int(x.split(":")[1]) for x in g)
        items = ob.peek(after=-1, limit=1000)
        assert [i.seq for i in items] == list(range(800))
        assert {i.id for i in items} == set(flat)


def test_kill9_loses_nothing_acknowledged_and_ids_stay_monotonic(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.outbox._producer", str(db), "1000000"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked += [ln.strip() for ln in proc.stdout.read().splitlines() if ln.strip()]
    ob = Outbox(path=db, storage_key=bytes(32), device_id="dev")
    stored = [i.id for i in ob.peek(after=-1, limit=10_000_000)]
    assert set(acked) <= set(stored), "an acknowledged result was lost"
    assert stored == sorted(stored, key=lambda x: int(x.split(":")[1]))
    new = int(ob.put(b"{}").split(":")[1])
    assert new > max(int(x.split(":")[1]) for x in stored)
    ob.close()


def test_count_bound_drops_oldest_routine_first_and_keeps_priority(tmp_path: Path) -> None:
    with make(tmp_path, max_count=8) as ob:
        prio = [ob.put(b'{"alert":%d}' % i, priority=True, kind="alert") for i in range(3)]
        routine = [ob.put(b'{"r":%d}' % i) for i in range(10)]
        assert ob.wait_idle()
        kept = [i for i, _ in all_items(ob)]
        assert set(prio) <= set(kept)
        assert kept == prio + routine[-5:]  # the five oldest routine results went
        s = ob.stats()
        assert s.depth == 8 and s.dropped["capacity_routine"] == 5 and s.dropped["capacity_priority"] == 0
        events = ob.drain_events()
        assert sum(e["count"] for e in events if e["event"] == "outbox_dropped") == 5
        assert all(e.get("reason") == "routine" for e in events)


def test_only_priority_left_drops_oldest_priority_counted(tmp_path: Path) -> None:
    with make(tmp_path, max_count=3) as ob:
        ids = [ob.put(b"{}", priority=True) for _ in range(5)]
        assert [i for i, _ in all_items(ob)] == ids[2:]
        assert ob.stats().dropped["capacity_priority"] == 2


def test_byte_bound(tmp_path: Path) -> None:
    with make(tmp_path, max_bytes=8192, max_payload_bytes=4096) as ob:
        for _ in range(10):
            ob.put(b'"' + b"x" * 1000 + b'"')
        s = ob.stats()
        assert s.bytes <= 8192 and s.depth == 7
        assert s.dropped["capacity_routine"] == 3
        with pytest.raises(OutboxError, match="max_payload_bytes"):
            ob.put(b"x" * 5000)


def test_ttl_per_class(tmp_path: Path) -> None:
    clock = Clock()
    with make(tmp_path, clock, ttl_routine_s=10.0, ttl_priority_s=100.0) as ob:
        ob.put(b'{"r":1}')
        p = ob.put(b'{"p":1}', priority=True)
        clock.t += 11
        # Expired results are never handed out, even before the sweep removes them.
        assert [i for i, _ in all_items(ob)] == [p]
        r2 = ob.put(b'{"r":2}')  # a commit after the expiry sweeps it
        assert ob.wait_idle()
        assert ob.stats().dropped["expired"] == 1
        assert [i for i, _ in all_items(ob)] == [p, r2]
        clock.t += 100
        ob.put(b"{}")
        assert ob.stats().dropped["expired"] == 3
        assert any(e["reason"] == "expired" for e in ob.drain_events())


def test_payload_encrypted_at_rest_and_bound_to_id(tmp_path: Path) -> None:
    marker = b"TOP-SECRET-RESULT-4f9a"
    with make(tmp_path) as ob:
        ob.put_many([b'{"s":"' + marker + b'"}'] * 50)
        assert ob.wait_idle()
        for f in tmp_path.iterdir():
            assert marker not in f.read_bytes(), f"{f.name} holds plaintext"
    # A row copied onto another seq fails authentication: the id is bound into the AAD.
    import sqlite3

    con = sqlite3.connect(tmp_path / "outbox.db")
    blob = con.execute("SELECT blob FROM results WHERE seq = 0").fetchone()[0]
    con.execute("UPDATE results SET blob = ? WHERE seq = 1", (blob,))
    con.commit()
    con.close()
    with make(tmp_path) as ob:
        items = ob.peek(after=-1, limit=100)
        assert [i.seq for i in items] == [0, *range(2, 50)]
        assert ob.stats().dropped["tampered"] == 1


def test_wrong_storage_key_reads_nothing(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ob.put(b"{}")
    with Outbox(path=tmp_path / "outbox.db", storage_key=bytes(32), device_id="dev-1", now=Clock()) as ob:
        assert ob.peek(after=-1, limit=10) == []
        assert ob.stats().dropped["tampered"] == 1


def test_corrupt_database_moved_aside_new_one_started(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ob.put_many([b"{}"] * 10)
    db = tmp_path / "outbox.db"
    (tmp_path / "outbox.db-wal").unlink(missing_ok=True)
    db.write_bytes(b"this is not sqlite" * 500)
    with make(tmp_path) as ob:
        kept = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
        assert kept and kept[0].read_bytes().startswith(b"this is not sqlite")
        events = ob.drain_events()
        assert events and events[0]["event"] == "outbox_corrupt"
        assert ob.stats().corrupt_files == 1
        rid = ob.put(b"{}")
        assert int(rid.split(":")[1]) >= 10, "a new database must not reuse ids"
        assert [i for i, _ in all_items(ob)] == [rid]
    with make(tmp_path) as ob:  # and it stays healthy: no crash loop
        assert ob.stats().corrupt_files == 0 and ob.stats().depth == 1


def test_corruption_found_while_running_is_moved_aside_and_serving_goes_on(tmp_path: Path) -> None:
    ob = make(tmp_path)
    try:
        ids = ob.put_many([b'{"n":1}'] * 2000)
        assert ob.wait_idle()
        db = tmp_path / "outbox.db"
        # Everything into the main file, then its pages (not the header) overwritten in place, as a failing
        # card would: the open connections find out on their next read.
        with sqlite3.connect(db) as side:
            side.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        with open(db, "r+b") as f:
            f.seek(4096)
            f.write(os.urandom(db.stat().st_size - 4096))
        assert ob.peek(after=-1, limit=10) == []  # the read fails: nothing handed out, no exception
        assert wait_for(lambda: ob.stats().corrupt_files == 1)
        kept = [p for p in tmp_path.iterdir() if p.name.startswith("outbox.db.corrupt-")]
        assert kept, "the corrupt file is kept for inspection"
        events = ob.drain_events()
        corrupt = [e for e in events if e["event"] == "outbox_corrupt"]
        assert len(corrupt) == 1 and corrupt[0]["lost"] == len(ids)
        assert ob.stats().dropped["corrupt"] == len(ids)  # counted, never silent
        rid = ob.put(b'{"n":2}')  # still serving, on a fresh file, with an id never used before
        assert int(rid.split(":")[1]) > int(ids[-1].split(":")[1])
        assert [i for i, _ in all_items(ob)] == [rid]
        assert ob.stats().alarm is None
    finally:
        ob.close()
    with make(tmp_path) as ob:  # reopened: healthy, the new result kept
        assert ob.stats().corrupt_files == 0 and [i for i, _ in all_items(ob)] == [rid]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_full_disk_degrades_to_memory_and_recovers(tmp_path: Path) -> None:
    clock = Clock()
    with make(tmp_path, clock, disk_retry_s=0.05, memory_max_count=20) as ob:
        before = ob.put_many([b'{"a":1}'] * 5)
        pages = ob._store.w.execute("PRAGMA page_count").fetchone()[0]
        ob._store.w.execute(f"PRAGMA max_page_count = {pages}")  # the seam: SQLITE_FULL on the next growth
        during = ob.put_many([b'{"big":"' + b"y" * 3000 + b'"}'] * 25)
        s = ob.stats()
        assert s.alarm is not None and "full" in s.alarm
        assert s.memory_depth == 20 and s.dropped["memory_full"] == 5
        assert [i for i, _ in all_items(ob)] == before + during[5:]  # order kept across disk and memory
        assert any(e["event"] == "outbox_disk_full" for e in ob.drain_events())
        ob._store.w.execute("PRAGMA max_page_count = 1073741823")
        clock.t += 1  # past disk_retry_s
        after = ob.put(b"{}")
        assert ob.wait_idle()
        for _ in range(100):
            if ob.stats().alarm is None:
                break
            ob.put(b"{}")
        s = ob.stats()
        assert s.alarm is None and s.memory_depth == 0
        assert any(e["event"] == "outbox_recovered" for e in ob.drain_events())
        ids = [i for i, _ in all_items(ob)]
        assert ids[: 5 + 20 + 1] == before + during[5:] + [after]
    with make(tmp_path) as ob:  # the flushed results are on disk
        assert ob.stats().depth >= 26


def test_full_tmpfs_enospc(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); covered by the page-limit test")
    try:
        clock = Clock()
        with make(mnt, clock, disk_retry_s=0.05) as ob:
            ob.put(b"{}")
            filler = mnt / "filler"
            with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
            ids = ob.put_many([b'"' + b"z" * 2000 + b'"'] * 30)
            assert ob.stats().alarm is not None
            filler.unlink()
            for _ in range(200):
                clock.t += 0.1
                ob.put(b"{}")
                if ob.stats().alarm is None:
                    break
            assert ob.stats().alarm is None
            assert set(ids) <= {i for i, _ in all_items(ob)}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_count", 0),
        ("max_bytes", 10),
        ("ttl_routine_s", 0.0),
        ("ttl_priority_s", float("nan")),
        ("commit_window_s", 2.0),
        ("max_batch", 0),
        ("memory_max_count", 0),
        ("disk_retry_s", 0.0),
        ("max_payload_bytes", 0),
    ],
)
def test_config_bounds(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"outbox.{key}"):
        OutboxConfig(**{key: value})  # type: ignore[arg-type]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Outbox(path=tmp_path / "x.db", storage_key=b"short", device_id="d")
    with pytest.raises(ValueError, match="device_id"):
        Outbox(path=tmp_path / "x.db", storage_key=KEY, device_id="a/b")
    with make(tmp_path) as ob:
        with pytest.raises(ValueError, match="kind"):
            ob.put(b"{}", kind="no spaces")
        ob.close()
        with pytest.raises(OutboxError, match="closed"):
            ob.put(b"{}")


@settings(max_examples=25, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=10), priority=st.booleans())
def test_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], priority: bool
) -> None:
    d = tmp_path_factory.mktemp("rt")
    with Outbox(path=d / "o.db", storage_key=KEY, device_id="p") as ob:
        ids = ob.put_many(payloads, priority=priority)
        items = ob.peek(after=-1, limit=100)
        assert [(i.id, i.payload, i.priority) for i in items] == [
            (r, p, priority) for r, p in zip(ids, payloads, strict=True)
        ]
