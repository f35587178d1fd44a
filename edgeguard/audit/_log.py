"""The device's append-only, hash-chained audit log (the writer side; ``_verify`` is the reader).

Layout in ``<state_dir>/audit/``: ``audit-000001.log``, ``audit-000002.log``, ... (one canonical JSON record
per line, ``_record``) and ``checkpoint.json`` (the latest signed checkpoint, written atomically).

Durability: records are written by one writer thread in groups and each group is ``fsync``ed before the
writer takes the next, so a power cut loses at most the group being written. A torn last record (a cut line,
a block of zeros the file system left after a crash) is found when the log is opened again: the file is cut
back to the end of the last complete record and an ``audit-torn`` record says where and how many bytes were
cut, so the chain goes on from the last record that was really written.

Checkpoints: after ``checkpoint_records`` records, or ``checkpoint_s`` after the first record that no
checkpoint covers yet, the writer appends an ``audit-checkpoint`` record whose data is the chain head (the
hash of the record before it), the count of records before it, the time, the signing key's id and an Ed25519
signature over those, writes it to ``checkpoint.json`` and hands it to ``publish`` (the MQTT ``events``
topic): a copy of the head the device cannot take back.

Rotation and retention: a file that would grow past ``max_file_bytes`` is closed; the next file starts with an
``audit-rotate`` record naming the previous file and its head (the chain runs across files). When there are
more than ``max_files`` files, an ``audit-retention`` record naming the oldest file, the last record in it
and that record's hash is written and checkpointed *before* that file is deleted, so a verifier can tell a
dropped file from a deleted one.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard._atomic import atomic_write
from edgeguard.errors import AuditError
from edgeguard.keys import public_key_id

from ._config import AuditConfig
from ._kinds import AUDITED_KINDS
from ._record import GENESIS, MAX_LINE_BYTES, Record, canonical, scrub

__all__ = ["AuditLog", "FILE_RE", "CHECKPOINT_FILE", "checkpoint_payload", "log_files"]

_log = logging.getLogger("edgeguard.audit")
FILE_RE = re.compile(r"audit-(\d{6})\.log")
CHECKPOINT_FILE = "checkpoint.json"
Publish = Callable[[str, dict[str, Any]], None]


def _iso(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_files(directory: Path) -> list[Path]:
    """The log files in chain order (by their number)."""
    try:
        names = [p for p in directory.iterdir() if FILE_RE.fullmatch(p.name)]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda p: p.name)


def checkpoint_payload(*, device: str, head: str, count: int, time: str, key_id: str) -> bytes:
    """The bytes a checkpoint's signature covers (the verifier rebuilds them from the record's data)."""
    return canonical(
        {"v": 1, "what": "edgeguard audit checkpoint", "device": device, "head": head, "count": count,
         "time": time, "key_id": key_id}
    )


class AuditLog:
    """Appends records; thread-safe. :meth:`record` queues (never blocks, never does I/O: callable from the
    event loop); :meth:`append` writes and fsyncs now (the CLI, tests, shutdown)."""

    def __init__(
        self,
        *,
        directory: Path,
        signing_key: Ed25519PrivateKey,
        device_id: str,
        config: AuditConfig | None = None,
        publish: Publish | None = None,
        now: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or AuditConfig()
        self.directory = directory
        self._key = signing_key
        self.key_id = public_key_id(signing_key.public_key())
        self._device = device_id
        self._publish = publish
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._mono = monotonic
        self._lock = threading.Lock()  # file, head and counters
        self._cond = threading.Condition()  # the queue
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._lost = 0  # records refused (queue full) or not written (I/O error), recorded once possible
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failed: str | None = None  # the last write error (health shows it)
        self._unwritten = 0  # records of the last failed group that did not reach the file
        self.last_checkpoint: dict[str, Any] | None = None
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = -1
        self._file: Path | None = None
        self._size = 0
        self._seq = -1  # seq of the head record
        self._head = GENESIS
        self._uncovered = 0  # records since the last checkpoint
        self._uncovered_since: float | None = None
        torn = self._open_tail()
        if torn is not None:
            self._write([("audit-torn", torn)])

    # -- public ----------------------------------------------------------------------------------------
    @property
    def head(self) -> tuple[int, str]:
        with self._lock:
            return self._seq, self._head

    def start(self) -> None:
        """Start the writer thread (group commit and timed checkpoints)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eg-audit", daemon=True)
            self._thread.start()

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """Queue a record for the writer thread. Bounded: when full, the record is counted as lost and an
        ``audit-lost`` record says how many once there is room (a flood cannot grow memory)."""
        clean = scrub(data)
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                self._lost += 1
                return
            self._queue.append((kind, clean))
            self._cond.notify()

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """The worker's event path: every event passes here; the kinds in :data:`AUDITED_KINDS` are
        recorded (queued; the writer thread writes them)."""
        if kind in AUDITED_KINDS:
            self.record(kind, data)

    def append(self, kind: str, data: dict[str, Any]) -> Record:
        """Write one record now (fsynced before this returns)."""
        return self._write([(kind, scrub(data))])[-1]

    def checkpoint(self) -> dict[str, Any]:
        """Write a signed checkpoint now (also when nothing is uncovered: shutdown, a test)."""
        with self._lock:
            self._checkpoint_locked()
            assert self.last_checkpoint is not None
            return self.last_checkpoint

    def stop(self) -> None:
        """Write what is queued, a final checkpoint, and close."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._drain()
        with self._lock:
            if self._uncovered and self.failed is None:
                self._checkpoint_locked()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def health(self) -> dict[str, Any]:
        with self._lock:
            cp = self.last_checkpoint
            return {
                "records": self._seq + 1,
                "head": self._head[:16],
                "last_checkpoint": None if cp is None else {"count": cp["count"], "time": cp["time"]},
                "lost": self._lost,
                "error": self.failed,
            }

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(self._timeout())
                if self._stopping:
                    return
            self._drain()
            with self._lock:
                due = self._uncovered_since is not None and (
                    self._mono() - self._uncovered_since >= self.config.checkpoint_s
                )
                if due and self.failed is None:
                    try:
                        self._checkpoint_locked()
                    except AuditError as exc:
                        self._failed(exc)

    def _timeout(self) -> float | None:
        since = self._uncovered_since
        if since is None:
            return None
        return max(0.0, self.config.checkpoint_s - (self._mono() - since))

    def _drain(self) -> None:
        with self._cond:
            batch = list(self._queue)
            self._queue.clear()
            lost, self._lost = self._lost, 0
        if lost:
            why = "the audit queue was full or a write failed"
            batch.append(("audit-lost", {"records": lost, "why": why}))
        if batch:
            try:
                self._write(batch)
            except AuditError as exc:
                self._failed(exc)
                # What did not reach the disk is counted, so the next record that does says how much was lost
                # (the "audit-lost" record itself, last in the batch, carries the earlier count).
                unwritten = self._unwritten
                with self._cond:
                    self._lost += unwritten - 1 + lost if lost and unwritten else unwritten

    def _failed(self, exc: AuditError) -> None:
        # The log is evidence: a write error is loud (health, device log) and the next group tries again.
        self.failed = str(exc)
        _log.error("%s", exc)

    # -- writing ---------------------------------------------------------------------------------------
    def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> list[Record]:
        with self._lock:
            out: list[Record] = []
            try:
                for kind, data in batch:
                    out.append(self._append_locked(kind, data))
                self._sync()
            except AuditError:
                # Written but not fsynced records may survive; counting them as lost overstates, never hides.
                self._unwritten = len(batch) - len(out)
                raise
            self.failed = None
            if self._uncovered >= self.config.checkpoint_records:
                self._checkpoint_locked()
            return out

    def _append_locked(self, kind: str, data: dict[str, Any]) -> Record:
        rec = Record.make(seq=self._seq + 1, time=_iso(self._now()), kind=kind, data=data, prev=self._head)
        line = rec.line()
        if self._fd < 0 or (self._size + len(line) > self.config.max_file_bytes and self._size > 0):
            self._rotate()
            rec = Record.make(seq=self._seq + 1, time=rec.time, kind=kind, data=data, prev=self._head)
            line = rec.line()
        self._raw_write(line)
        self._seq, self._head = rec.seq, rec.hash
        self._uncovered += 1
        if self._uncovered_since is None:
            self._uncovered_since = self._mono()
        return rec

    def _raw_write(self, line: bytes) -> None:
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            # A partial line may be on disk now: cut back to the last whole record so the next one is not
            # glued to it (a reopen would cut it too, as a torn tail).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise AuditError(f"audit log {self._file}: write failed: {exc.strerror or exc}") from None
        self._size += len(line)

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"audit log {self._file}: fsync failed: {exc.strerror or exc}") from None

    def _rotate(self) -> None:
        previous = self._file
        files = log_files(self.directory)
        number = int(FILE_RE.fullmatch(files[-1].name).group(1)) + 1 if files else 1  # type: ignore[union-attr]
        path = self.directory / f"audit-{number:06d}.log"
        if self._fd >= 0:
            self._sync()
            os.close(self._fd)
            self._fd = -1
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"audit log {path}: cannot create: {exc.strerror or exc}") from None
        _fsync_dir(self.directory)
        self._file, self._size = path, 0
        if previous is not None:
            # The new file starts with the previous head: the chain runs on across files.
            rec = Record.make(seq=self._seq + 1, time=_iso(self._now()), kind="audit-rotate",
                              data={"previous_file": previous.name, "previous_head": self._head},
                              prev=self._head)
            self._raw_write(rec.line())
            self._seq, self._head = rec.seq, rec.hash
            self._uncovered += 1
            self._retain([*files, path])

    def _retain(self, files: list[Path]) -> None:
        """Drop the oldest files beyond ``max_files``, each only after a signed record of what it held."""
        excess = len(files) - self.config.max_files
        for old, nxt in itertools.pairwise(files[:max(excess, 0) + 1]):
            first = _first_record(nxt)
            if first is None:
                continue
            rec = Record.make(seq=self._seq + 1, time=_iso(self._now()), kind="audit-retention",
                              data={"dropped_file": old.name, "through_seq": first.seq - 1,
                                    "head": first.prev, "policy": f"keep {self.config.max_files} files"},
                              prev=self._head)
            self._raw_write(rec.line())
            self._seq, self._head = rec.seq, rec.hash
            self._uncovered += 1
            self._checkpoint_locked()  # fsyncs: the record of the drop is durable before the drop
            try:
                old.unlink()
            except OSError as exc:
                _log.error("audit retention: cannot remove %s: %s", old, exc.strerror or exc)
            _fsync_dir(self.directory)

    def _checkpoint_locked(self) -> None:
        if self._fd < 0:
            self._rotate()
        when = _iso(self._now())
        count = self._seq + 1
        payload = checkpoint_payload(device=self._device, head=self._head, count=count, time=when,
                                     key_id=self.key_id)
        data = {"device": self._device, "head": self._head, "count": count, "time": when,
                "key_id": self.key_id, "sig": self._key.sign(payload).hex()}
        rec = Record.make(seq=self._seq + 1, time=when, kind="audit-checkpoint", data=data, prev=self._head)
        self._raw_write(rec.line())
        self._sync()
        self._seq, self._head = rec.seq, rec.hash
        self._uncovered, self._uncovered_since = 0, None
        self.last_checkpoint = data
        try:
            atomic_write(self.directory / CHECKPOINT_FILE, canonical(data) + b"\n", mode=0o600)
        except OSError as exc:
            _log.error("audit checkpoint file: %s", exc.strerror or exc)
        if self._publish is not None:
            try:
                # Nested: the event envelope has its own time and device; the signed fields stay as signed.
                self._publish("audit-checkpoint", {"checkpoint": dict(data)})
            except Exception:  # the log must not depend on the link
                _log.exception("publishing the audit checkpoint failed")

    # -- opening ---------------------------------------------------------------------------------------
    def _open_tail(self) -> dict[str, Any] | None:
        """Find the head in the newest file; cut a torn tail back to the last whole record (returned as the
        data of the ``audit-torn`` record to write, or None)."""
        files = log_files(self.directory)
        if not files:
            return None
        path = files[-1]
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditError(f"audit log {path}: cannot open: {exc.strerror or exc}") from None
        try:
            data = _read_all(fd, path)
            good, last = _last_good(data)
            if last is None and len(files) > 1:  # a new file cut before its first record: the head is behind
                last = _last_good(files[-2].read_bytes())[1]
            if last is not None:
                self._seq, self._head = last.seq, last.hash
            torn = None
            if good < len(data):
                os.ftruncate(fd, good)
                os.fsync(fd)
                torn = {"file": path.name, "offset": good, "bytes_cut": len(data) - good,
                        "after_seq": self._seq, "why": "incomplete record at the end (power loss or crash)"}
                _log.warning("audit log %s: cut a torn record of %d bytes at offset %d", path,
                             len(data) - good, good)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._file, self._size = fd, path, good
        cp = self.directory / CHECKPOINT_FILE
        try:
            self.last_checkpoint = json.loads(cp.read_bytes()[:MAX_LINE_BYTES])
        except (OSError, ValueError):
            self.last_checkpoint = None
        self._uncovered = 1  # unknown since the last checkpoint: make sure the next one comes
        self._uncovered_since = self._mono()
        return torn


def _read_all(fd: int, path: Path) -> bytes:
    size = os.fstat(fd).st_size
    if size > (1 << 31):
        raise AuditError(f"audit log {path}: {size} bytes is not a log this device wrote")
    chunks: list[bytes] = []
    offset = 0
    while True:
        b = os.pread(fd, 1 << 20, offset)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        offset += len(b)


def _last_good(data: bytes) -> tuple[int, Record | None]:
    """The offset just past the last line that is a whole record, and that record."""
    end = len(data)
    while end > 0:
        nl = data.rfind(b"\n", 0, end)
        if nl < 0:
            return 0, None
        start = data.rfind(b"\n", 0, nl) + 1
        rec = parse_line(data[start:nl])
        if rec is not None:
            return nl + 1, rec
        end = start  # torn or zero-filled: look one line further back
    return 0, None


def parse_line(line: bytes) -> Record | None:
    """A record from one line (without its newline) if it is canonical and its hash matches, else None."""
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or set(doc) != {"seq", "time", "kind", "data", "prev", "hash"}:
        return None
    seq, when, kind, data, prev, h = (doc[k] for k in ("seq", "time", "kind", "data", "prev", "hash"))
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(when, str)
            and isinstance(kind, str) and isinstance(data, dict) and isinstance(prev, str)
            and isinstance(h, str)):
        return None
    try:
        rec = Record.make(seq=seq, time=when, kind=kind, data=data, prev=prev)
    except ValueError:
        return None
    if rec.hash != h or rec.line() != line + b"\n":
        return None
    return rec


def _first_record(path: Path) -> Record | None:
    try:
        with open(path, "rb") as f:
            return parse_line(f.readline(MAX_LINE_BYTES + 1).rstrip(b"\n"))
    except OSError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
