"""The audit log on real files: chaining, signed checkpoints, rotation and retention, torn tails, bounds,
no secrets."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.audit import (
    CHECKPOINT_FILE,
    AuditConfig,
    AuditLog,
    check_checkpoint,
    log_files,
    parse_line,
    verify_log,
)
from tests.audit._helpers import write_log


def _records(directory: Path) -> list[Any]:
    out = []
    for f in log_files(directory):
        out += [parse_line(line) for line in f.read_bytes().splitlines()]
    return out


def test_records_chain_and_checkpoints_verify(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    published: list[dict[str, Any]] = []
    write_log(tmp_path, key, 25, published=published, checkpoint_records=10)
    report = verify_log(directory=tmp_path, pub=key.public_key(), external=published)
    assert report.ok, report.problems
    recs = _records(tmp_path)
    assert all(r is not None for r in recs)
    assert [r.seq for r in recs] == list(range(len(recs)))
    assert [r.kind for r in recs].count("audit-checkpoint") == 3 == len(published)  # 10, 20, stop
    assert all(check_checkpoint(cp, key.public_key()) is None for cp in published)
    assert json.loads((tmp_path / CHECKPOINT_FILE).read_text()) == published[-1]
    assert report.covered == published[-1]["count"] == len(recs) - 1


def test_checkpoint_of_another_key_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    write_log(tmp_path, key, 5, checkpoint_records=3)
    report = verify_log(directory=tmp_path, pub=Ed25519PrivateKey.generate().public_key())
    assert not report.ok
    assert "not by the key given" in str(report.problems[0]) and report.problems[0].seq == 3


def test_rotation_keeps_the_chain_and_retention_is_signed(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    published: list[dict[str, Any]] = []
    write_log(tmp_path, key, 400, published=published, checkpoint_records=50, max_file_bytes=16384,
              max_files=3)
    files = log_files(tmp_path)
    assert len(files) == 3  # bounded: older files were dropped
    first = parse_line(files[0].read_bytes().splitlines()[0])
    assert first is not None and first.seq > 0
    recs = _records(tmp_path)
    retention = [r for r in recs if r.kind == "audit-retention"]
    assert retention and retention[-1].data["through_seq"] == first.seq - 1
    for f in files[1:]:  # every later file starts with the previous file's head
        head = parse_line(f.read_bytes().splitlines()[0])
        assert head is not None and head.kind == "audit-rotate"
    report = verify_log(directory=tmp_path, pub=key.public_key(), external=published)
    assert report.ok, report.problems
    # Deleting the oldest remaining file by hand is not a retention.
    files[0].unlink()
    report = verify_log(directory=tmp_path, pub=key.public_key())
    assert not report.ok and "no signed retention record" in str(report.problems[0])


def test_torn_tail_is_cut_recorded_and_the_chain_goes_on(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    write_log(tmp_path, key, 6)
    path = log_files(tmp_path)[-1]
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    # Power cut half-way through the last record (the final checkpoint) and a zero-filled block after it.
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40] + b"\0" * 100)
    report = verify_log(directory=tmp_path, pub=key.public_key())
    assert report.torn is not None and f"line {len(lines)}" in report.torn
    log = AuditLog(directory=tmp_path, signing_key=key, device_id="dev-1")
    log.append("restart", {})
    log.stop()
    recs = _records(tmp_path)
    torn = [r for r in recs if r.kind == "audit-torn"]
    assert len(torn) == 1 and torn[0].data["bytes_cut"] == 140 and torn[0].seq == len(lines) - 1
    report = verify_log(directory=tmp_path, pub=key.public_key())
    assert report.ok and report.torn is None, report.problems


def test_no_secret_and_bounded_data(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(directory=tmp_path, signing_key=key, device_id="dev-1")
    secret = "app-token-0123456789abcdef"
    log.append("token-refused", {"token": secret, "password": secret, "token_name": "app",
                                 "reason": "x" * 100_000, "nested": {"list": list(range(10_000))}})
    log.stop()
    text = "".join(f.read_text() for f in log_files(tmp_path))
    assert secret not in text
    rec = _records(tmp_path)[0]
    assert rec.data["token"] == "[redacted]" and rec.data["token_name"] == "app"
    assert max(len(line) for line in text.splitlines()) < 8192


def test_a_flood_is_bounded_and_its_loss_recorded(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(directory=tmp_path, signing_key=key, device_id="dev-1", config=AuditConfig(queue_size=16))
    for i in range(100):  # the writer thread is not started: the queue fills
        log.event("token-refused", {"i": i})
    log.event("input-rejected", {"i": -1})  # not a security kind: not recorded
    assert log.health()["lost"] == 84
    log.stop()
    kinds = [r.kind for r in _records(tmp_path)]
    assert kinds.count("token-refused") == 16 and "input-rejected" not in kinds
    lost = [r for r in _records(tmp_path) if r.kind == "audit-lost"]
    assert lost[0].data["records"] == 84


def test_writer_thread_checkpoints_on_time(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    published: list[dict[str, Any]] = []
    got = threading.Event()

    def publish(_kind: str, data: dict[str, Any]) -> None:
        published.append(data["checkpoint"])
        got.set()

    log = AuditLog(directory=tmp_path, signing_key=key, device_id="dev-1",
                   config=AuditConfig(checkpoint_s=0.2, checkpoint_records=1000), publish=publish)
    log.start()
    log.record("reloaded", {"reloads": 1})
    assert got.wait(10), "no timed checkpoint"
    log.stop()
    assert published[0]["count"] >= 1
    assert verify_log(directory=tmp_path, pub=key.public_key(), external=published).ok


def test_a_batch_that_cannot_be_written_is_counted_and_recorded_later(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(directory=tmp_path, signing_key=key, device_id="dev-1")
    log.append("service-start", {})
    real_fd = log._fd
    log._fd = os.open("/dev/full", os.O_WRONLY)  # the disk is full: every write fails with ENOSPC
    log.record("token-refused", {"i": 1})
    log.record("token-refused", {"i": 2})
    log._drain()
    health = log.health()
    assert health["error"] is not None and "No space left" in health["error"] and health["lost"] == 2
    os.close(log._fd)
    log._fd = real_fd  # space again
    log.record("reloaded", {})
    log._drain()
    log.stop()
    recs = _records(tmp_path)
    lost = [r for r in recs if r.kind == "audit-lost"]
    assert len(lost) == 1 and lost[0].data["records"] == 2 and log.health()["error"] is None
    assert verify_log(directory=tmp_path, pub=key.public_key()).ok
