"""Durable store-and-forward queue: group commit, bounds and drops, TTL, encryption at rest, degraded mode."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from edgeguard.errors import OutboxError
from edgeguard.outbox._config import OutboxConfig, OutboxItem, OutboxStats
from edgeguard.outbox._sealing import NONCE, Sealer, SeqReservation
from edgeguard.outbox._store import NO_EXPIRY, Row, Store, StoreCorrupt, classify, move_aside

__all__ = ["Outbox"]

log = logging.getLogger("edgeguard.outbox")

# Ids go unescaped into JSON envelopes and into the AAD: the same charset as a topic level we build.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Outbox:
    """put() returns a result id only once the result is committed to disk (or, while the disk is full, held
    in the bounded memory queue with ``stats().alarm`` set). The link reads with peek(); ack() removes."""

    def __init__(
        self,
        *,
        path: Path,
        storage_key: bytes,
        device_id: str,
        config: OutboxConfig | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if len(storage_key) != 32:
            raise ValueError("storage_key must be 32 bytes (AES-256-GCM)")
        if not _DEVICE_ID.fullmatch(device_id):
            raise ValueError(f"device_id {device_id!r} must be 1..64 of [A-Za-z0-9_.-]")
        self.path = Path(path)
        self.config = config or OutboxConfig()
        self.device_id = device_id
        self._sealer = Sealer(storage_key)
        self._now = now
        self._seqfile = SeqReservation(self.path.with_name(self.path.name + ".seq"))
        self._lock = threading.Lock()  # pending queue, sequence, memory queue, events
        self._cond = threading.Condition(self._lock)
        self._rlock = threading.Lock()  # reader connection
        self._pending: deque[Row] = deque()
        self._acks: list[int] = []
        self._done_seq = -1  # every seq <= this is committed (or held in memory while degraded)
        self._memory: dict[int, Row] = {}
        self._memory_bytes = 0
        self._memory_drops = 0
        self._alarm: str | None = None
        self._retry_at = 0.0
        self._last_expire = 0.0
        self._corrupt_files = 0
        self._corrupt_pending = False
        self._tampered = 0
        self._waiters: deque[tuple[int, threading.Lock]] = deque()
        self._events: deque[dict[str, Any]] = deque(maxlen=256)
        self._closing = False
        self._closed = False
        self._busy = False  # a commit is running (the committer thread or a leading producer)
        self._store = self._open_store()
        self._next_seq = max(self._store.meta["next_seq"], self._seqfile.upto)
        self._reserved = self._next_seq
        self._reserve(self._next_seq + SeqReservation.BLOCK)
        self._done_seq = self._next_seq - 1
        self._thread = threading.Thread(target=self._committer, name="edgeguard-outbox", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------ opening
    def _open_store(self) -> Store:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return Store(self.path, synchronous_full=self.config.synchronous_full)
        except StoreCorrupt as exc:
            return self._replace_corrupt(str(exc), lost=None)

    def _replace_corrupt(self, reason: str, lost: int | None) -> Store:
        # Never crash-loop on a bad file: keep it for inspection, start a fresh database, say so.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._now())) + f"-{os.getpid()}"
        kept = move_aside(self.path, stamp)
        self._corrupt_files += 1
        log.error(
            "outbox database %s is corrupt (%s); kept as %s, started a new one", self.path, reason, kept
        )
        store = Store(self.path, synchronous_full=self.config.synchronous_full)
        if lost:
            store.bump_meta("dropped_corrupt", lost)
        self._event("outbox_corrupt", reason=reason, kept=str(kept), lost=lost)
        return store

    def _reserve(self, upto: int) -> None:
        if not self._seqfile.reserve(upto):
            self._reserved = max(self._reserved, self._next_seq + 1)
        else:
            self._reserved = upto

    # -------------------------------------------------------------------------------------------- producing
    def put(self, payload: bytes, *, priority: bool = False, kind: str = "result") -> str:
        """Store one result (a JSON text); returns its id once it is durable."""
        return self.put_many([payload], priority=priority, kind=kind)[0]

    def put_many(
        self, payloads: Sequence[bytes], *, priority: bool = False, kind: str = "result"
    ) -> list[str]:
        """Store several results in order; returns their ids once all are durable."""
        if not kind.isidentifier() or len(kind) > 32:
            raise ValueError(f"kind {kind!r} must be an identifier of at most 32 characters")
        limit = self.config.max_payload_bytes
        for p in payloads:
            if len(p) > limit:
                raise OutboxError(f"result of {len(p)} bytes exceeds outbox max_payload_bytes={limit}")
        now = self._now()
        ttl = self.config.ttl_priority_s if priority else self.config.ttl_routine_s
        expires = NO_EXPIRY if ttl is None else now + ttl
        prio = int(priority)
        nonces = os.urandom(NONCE * len(payloads))
        ids: list[str] = []
        with self._cond:
            if self._closing:
                raise OutboxError("outbox is closed")
            for i, payload in enumerate(payloads):
                seq = self._next_seq
                self._next_seq += 1
                rid = f"{self.device_id}:{seq}"
                blob = self._sealer.seal(nonces[i * NONCE : (i + 1) * NONCE], rid, kind, prio, payload)
                self._pending.append((seq, prio, kind, now, expires, len(blob), blob))
                ids.append(rid)
            last = self._next_seq - 1
            # Group commit without a hand-off when nobody else is writing: this producer commits the pending
            # batch itself (its own rows and whatever queued before). Otherwise it waits on a private lock,
            # released by whoever commits its rows, so a commit wakes only the producers it served; it is
            # registered in this same critical section (one lock round per waiting call). Whoever is
            # committing notifies the committer when done, which then takes everything queued at once.
            lead = not self._busy
            if lead:
                self._busy = True
                batch, acks = self._take_batch()
            else:
                waiter = self._wait_for(last)
        if lead:
            try:
                self._commit(batch, acks)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            with self._cond:
                if self._done_seq >= last:
                    return ids
                waiter = self._wait_for(last)  # more rows than one batch takes: the committer goes on
        while not waiter.acquire(timeout=5.0):
            if not self._thread.is_alive():
                raise OutboxError("outbox committer stopped; result not stored")
        return ids

    def _wait_for(self, last: int) -> threading.Lock:
        # Caller holds the lock; the returned lock is released once every seq <= last is stored.
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append((last, waiter))
        return waiter

    # ------------------------------------------------------------------------------------------- consuming
    def peek(self, *, after: int, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` results with seq > ``after``, oldest first, decrypted; tampered rows dropped."""
        now = self._now()
        try:
            with self._rlock:
                rows = self._store.peek(after, limit, now)
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            if kind is StoreCorrupt:
                with self._cond:
                    self._corrupt_pending = True
                    self._cond.notify_all()
            rows = []
        items: list[OutboxItem] = []
        bad: list[int] = []
        # The link's hot path (one call per few hundred results): names bound once, tuples built positionally.
        prefix, opener, make = f"{self.device_id}:", self._sealer.open, OutboxItem._make
        for seq, prio, kind_, created, blob in rows:
            rid = prefix + str(seq)
            payload = opener(rid, kind_, prio, blob)
            if payload is None:
                bad.append(seq)
            else:
                items.append(make((seq, rid, kind_, prio == 1, created, payload)))
        if len(rows) < limit:
            with self._lock:
                mem = [r for s, r in self._memory.items() if s > after and r[4] > now]
            for seq, prio, kind_, created, _exp, _size, blob in mem[: limit - len(items)]:
                item = self._decrypt(seq, prio, kind_, created, blob)
                if item is not None:
                    items.append(item)
        if bad:
            self._drop_tampered(bad)
        return items

    def _decrypt(self, seq: int, prio: int, kind: str, created: float, blob: bytes) -> OutboxItem | None:
        rid = f"{self.device_id}:{seq}"
        payload = self._sealer.open(rid, kind, prio, blob)
        if payload is None:
            return None
        return OutboxItem(seq=seq, id=rid, kind=kind, priority=bool(prio), created=created, payload=payload)

    def _drop_tampered(self, seqs: list[int]) -> None:
        log.error(
            "outbox: %d stored results failed authentication (wrong key or tampered); dropped", len(seqs)
        )
        with self._cond:
            self._tampered += len(seqs)
            self._event("outbox_dropped", reason="tampered", count=len(seqs))
        self.ack(seqs)

    def ack(self, seqs: Iterable[int]) -> None:
        """The broker has the results: remove them (applied with the next commit; never blocks)."""
        with self._cond:
            first = not self._acks
            if not self._memory:
                self._acks.extend(seqs)
            else:
                for s in seqs:
                    row = self._memory.pop(s, None)
                    if row is not None:
                        self._memory_bytes -= row[5]
                    else:
                        self._acks.append(s)
            # Wake the committer for a full batch, or so that it starts its 50 ms timer for the first ack.
            if len(self._acks) >= 256 or (first and self._acks):
                self._cond.notify_all()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until pending results and acks are written (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._acks or self._busy) and not self._alarm:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def last_seq(self) -> int:
        """The newest stored seq (cheap: lets a reader skip a query when nothing new arrived)."""
        return self._done_seq

    # ----------------------------------------------------------------------------------------------- status
    def stats(self) -> OutboxStats:
        try:
            with self._rlock:
                oldest = self._store.oldest_created()
        except Exception as exc:
            if classify(exc) is None:
                raise
            oldest = None
        with self._lock:
            meta = dict(self._store.meta)
            if self._memory:
                first = next(iter(self._memory.values()))[3]
                oldest = first if oldest is None else min(oldest, first)
            dropped = {
                "capacity_routine": meta["dropped_capacity_routine"],
                "capacity_priority": meta["dropped_capacity_priority"],
                "expired": meta["dropped_expired"],
                "tampered": meta["dropped_tampered"] + self._tampered,
                "corrupt": meta["dropped_corrupt"],
                "memory_full": self._memory_drops,
            }
            return OutboxStats(
                depth=meta["count"] + len(self._memory),
                bytes=meta["bytes"] + self._memory_bytes,
                memory_depth=len(self._memory),
                oldest_age_s=None if oldest is None else max(0.0, self._now() - oldest),
                next_seq=self._next_seq,
                dropped=dropped,
                alarm=self._alarm,
                corrupt_files=self._corrupt_files,
            )

    def drain_events(self) -> list[dict[str, Any]]:
        """Events since the last call (drops, corrupt file, disk full/recovered), oldest first."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def _event(self, event: str, **data: Any) -> None:
        self._events.append({"event": event, "time": self._now(), **data})

    # ---------------------------------------------------------------------------------------------- closing
    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            self._closed = True
            if self._memory:
                log.error(
                    "outbox closed with %d results only in memory (disk unavailable)", len(self._memory)
                )
            with self._rlock:
                self._store.close()
        if not self._memory:
            self._reserve(self._next_seq)  # clean stop: the next start continues without a gap

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------- committer
    def _committer(self) -> None:
        # Commits what producers did not commit themselves (results that arrived while another commit ran),
        # acks, expiry sweeps and retries of a full disk. ``_busy`` makes it and leading producers take turns.
        cfg = self.config
        while True:
            with self._cond:
                while True:
                    # Acks wait up to 50 ms to be removed together: deleting after every PUBACK would cost
                    # one transaction per ack while draining a backlog.
                    if not self._busy and (
                        self._pending or len(self._acks) >= 256 or self._closing or self._corrupt_pending
                    ):
                        break
                    self._cond.wait(timeout=0.05 if self._acks else 1.0)
                    if not self._busy and (
                        self._acks or self._alarm or self._now() - self._last_expire >= 1.0
                    ):
                        break
                final = self._closing and not self._pending and not self._acks
                self._busy = True
            try:
                if final:
                    if self._memory:
                        self._retry_at = 0.0
                        self._commit([], [])  # last attempt to get memory-held results onto the disk
                    return
                if cfg.commit_window_s and len(self._pending) < cfg.max_batch and not self._closing:
                    time.sleep(cfg.commit_window_s)  # let concurrent producers join this commit
                with self._cond:
                    batch, acks = self._take_batch()
                self._commit(batch, acks)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take_batch(self) -> tuple[list[Row], list[int]]:
        # Caller holds the lock.
        n = min(len(self._pending), self.config.max_batch)
        batch = [self._pending.popleft() for _ in range(n)]
        acks, self._acks = self._acks, []
        if self._corrupt_pending:
            self._corrupt_pending = False
            self._recover_corrupt("read failed")
        return batch, acks

    def _commit(self, batch: list[Row], acks: list[int]) -> None:
        now = self._now()
        with self._cond:
            degraded = self._alarm is not None
            if degraded and now < self._retry_at:
                self._to_memory(batch)
                self._acks[:0] = acks  # keep for the retry
                self._finish(batch)
                return
            if batch and batch[-1][0] >= self._reserved:
                self._reserve(batch[-1][0] + SeqReservation.BLOCK)
            flush = list(self._memory.values()) if degraded else []
        if self._try_disk(flush + batch, acks, now=now):
            with self._cond:
                for r in flush:
                    if self._memory.pop(r[0], None) is not None:
                        self._memory_bytes -= r[5]
                    else:  # acknowledged while we were writing it: remove it from the disk too
                        self._acks.append(r[0])
                if degraded:
                    log.warning("outbox: disk writable again; %d results flushed from memory", len(flush))
                    self._event("outbox_recovered", flushed=len(flush))
                self._alarm = None
                self._finish(batch)
        else:
            with self._cond:
                self._to_memory(batch)
                self._acks[:0] = acks
                self._finish(batch)

    def _try_disk(self, rows: list[Row], acks: list[int], *, now: float | None = None) -> bool:
        now = self._now() if now is None else now
        expire = now - self._last_expire >= 1.0
        for _attempt in range(2):
            try:
                drops = self._store.write(
                    rows,
                    acks,
                    now=now,
                    max_count=self.config.max_count,
                    max_bytes=self.config.max_bytes,
                    expire=expire,
                    next_seq=self._next_seq_snapshot(),
                )
            except Exception as exc:
                kind = classify(exc)
                if kind is None:
                    raise
                if kind is StoreCorrupt:
                    with self._cond:
                        self._recover_corrupt(str(exc))
                    continue
                with self._cond:
                    if self._alarm is None:
                        log.error("outbox: cannot write to disk (%s); holding results in memory", exc)
                        self._event("outbox_disk_full", reason=str(exc))
                    self._alarm = f"disk unavailable: {exc}"
                    self._retry_at = now + self.config.disk_retry_s
                    self._cond.notify_all()
                return False
            if expire:
                self._last_expire = now
            if drops:
                with self._cond:
                    for reason, n in drops.items():
                        self._event("outbox_dropped", reason=reason, count=n)
                log.warning("outbox dropped results: %s", drops)
            return True
        return False

    def _next_seq_snapshot(self) -> int:
        with self._lock:
            return self._next_seq

    def _recover_corrupt(self, reason: str) -> None:
        # Caller holds the lock. Results in the corrupt file are counted as lost; new ones go to a fresh file.
        lost = self._store.meta.get("count", 0)
        with self._rlock:
            self._store.close()
            self._store = self._replace_corrupt(reason, lost=lost or None)

    def _to_memory(self, batch: list[Row]) -> None:
        # Caller holds the lock. Bounded: drop the oldest routine result (then the oldest of any class).
        cfg = self.config
        for row in batch:
            self._memory[row[0]] = row
            self._memory_bytes += row[5]
        dropped = 0
        while len(self._memory) > cfg.memory_max_count or self._memory_bytes > cfg.memory_max_bytes:
            victim = next((s for s, r in self._memory.items() if r[1] == 0), None)
            if victim is None:
                victim = next(iter(self._memory))
            self._memory_bytes -= self._memory.pop(victim)[5]
            dropped += 1
        if dropped:
            self._memory_drops += dropped
            self._event("outbox_dropped", reason="memory_full", count=dropped)

    def _finish(self, batch: list[Row]) -> None:
        # Caller holds the lock: wake the producers whose results are now stored.
        if batch:
            self._done_seq = max(self._done_seq, batch[-1][0])
        while self._waiters and self._waiters[0][0] <= self._done_seq:
            self._waiters.popleft()[1].release()
        self._cond.notify_all()
