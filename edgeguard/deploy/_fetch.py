"""Fetching a sealed bundle into ``<state_dir>/deploy/partial-<sha256>.egm``: over MQTT chunks (through
:class:`ChunkGate`) or from a local path, then its SHA-256 checked against the signed command's.

Only ciphertext touches the disk (the bundle is sealed for its recipients). Memory stays bounded: a chunk is
written where it belongs as it arrives (paho holds one payload at a time), the whole file is hashed in 1 MiB
reads. Chunks already written stay when the network drops: on reconnection the link subscribes again, the
broker re-delivers the retained chunks, and those already held are skipped.

Every subscription names one exact topic, never a wildcard: RabbitMQ's MQTT plugin hands retained messages
only to exact-topic subscriptions. The meta first, then a sliding window of :data:`WINDOW` chunk topics, each
unsubscribed once its chunk is on disk and replaced by the next missing one; the broker therefore has at most
that many chunks in flight to the device.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeguard.errors import CommandRefused

from ._format import ChunkGate, ChunkRefused
from ._steps import StepHook

__all__ = ["WINDOW", "Fetcher", "SubtreeLink", "partial_path", "sha256_of"]

_log = logging.getLogger("edgeguard.deploy")
_READ = 1024 * 1024
WINDOW = 8  # chunk topics subscribed at once (each chunk <= 1 MiB)


class SubtreeLink(Protocol):
    def on_fleet_subtree(
        self,
        suffix: str,
        callback: Callable[[str, bytes], None],
        *,
        max_bytes: int,
        level: str = "+",
        timeout: float | None = None,
    ) -> bool: ...

    def off_fleet_subtree(self, suffix: str, level: str | None = None) -> None: ...


def partial_path(state_dir: Path, sha256: str) -> Path:
    return Path(state_dir) / "deploy" / f"partial-{sha256}.egm"


def sha256_of(fd: int, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_READ, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _open_partial(path: Path, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # a leftover of an earlier attempt: its chunks are not known to be whole
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


class Fetcher:
    def __init__(
        self,
        *,
        state_dir: Path,
        sha256: str,
        size: int,
        steps: StepHook,
        stall_s: float,
        progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sha256 = sha256
        self.size = size
        self.path = partial_path(state_dir, sha256)
        self._steps = steps
        self._stall_s = stall_s
        self._progress = progress or (lambda have, total: None)
        self._clock = clock
        self._gate = ChunkGate(sha256=sha256, size=size)
        self._have: set[int] = set()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._wake = threading.Event()  # a chunk landed or the meta came: the window moves
        self._landed: list[int] = []  # chunk indices written since the window last moved (lock)
        self._window: set[int] = set()  # chunk indices subscribed to (the fetching thread's own)
        self._following = 0  # the next chunk index not yet considered for the window
        self._fd = -1
        self._last = clock()
        self.refused = 0
        self.last_refusal: str | None = None

    # -- MQTT: the link thread calls on_message; the command thread waits in fetch_mqtt
    def on_message(self, level: str, payload: bytes) -> None:
        if not payload:
            return  # a retained message being deleted
        try:
            with self._lock:
                if level == "meta":
                    self._gate.accept_meta(payload)
                    self._last = self._clock()
                    self._check_done()
                    self._wake.set()
                    return
                index = self._gate.check_chunk(level, len(payload))
                if index in self._have:
                    return  # re-delivered after a reconnection: already on disk
                meta = self._gate.meta
                assert meta is not None
                if self._steps.wants("mid-chunk") and self._have:
                    os.pwrite(self._fd, payload[: len(payload) // 2], index * meta.chunk_size)
                    os.fsync(self._fd)
                    self._steps.at("mid-chunk")
                os.pwrite(self._fd, payload, index * meta.chunk_size)
                self._have.add(index)
                self._landed.append(index)
                self._wake.set()
                self._last = self._clock()
                self._progress(len(self._have), meta.chunks)
                if len(self._have) == 2:
                    os.fsync(self._fd)
                    self._steps.at("chunk-written")
                self._check_done()
        except ChunkRefused as exc:
            self.refused += 1
            self.last_refusal = str(exc)
            _log.warning("deploy: bundle message %s dropped: %s", level[:20], exc)

    def _check_done(self) -> None:
        meta = self._gate.meta
        if meta is not None and len(self._have) == meta.chunks:
            self._done.set()

    def fetch_mqtt(self, link: SubtreeLink, max_bytes: int, stop: threading.Event) -> None:
        """Subscribe, wait until every chunk is on disk (or nothing new came for ``stall_s``), unsubscribe,
        check the digest. ``CommandRefused("fetch" | "digest")`` otherwise."""
        self._fd = _open_partial(self.path, self.size)
        suffix = f"bundles/{self.sha256}"
        try:
            # The meta first: a broker sends retained messages in its own order, and a chunk that came
            # before the meta could not be checked (and is not buffered). The chunks once the meta is in.
            link.on_fleet_subtree(suffix, self.on_message, max_bytes=max_bytes, level="meta")
            while not self._done.is_set():
                self._wake.wait(0.2)
                self._wake.clear()
                if stop.is_set():
                    raise CommandRefused("fetch", "deploy stopped (the service is stopping or rolled back)")
                with self._lock:
                    landed, self._landed = self._landed, []
                    idle = self._clock() - self._last
                    have, meta = len(self._have), self._gate.meta
                if self._done.is_set():
                    break
                if meta is not None:
                    self._move_window(link, suffix, max_bytes=max_bytes, landed=landed, chunks=meta.chunks)
                if idle > self._stall_s:
                    got = f"{have} of {meta.chunks} chunks" if meta is not None else "no bundle meta"
                    why = f"; last dropped: {self.last_refusal}" if self.last_refusal else ""
                    raise CommandRefused("fetch", f"nothing new for {self._stall_s:g} s ({got}){why}")
        except BaseException:
            link.off_fleet_subtree(suffix)
            self._close()
            self.path.unlink(missing_ok=True)
            raise
        link.off_fleet_subtree(suffix)
        self._finish()

    def _move_window(
        self, link: SubtreeLink, suffix: str, *, max_bytes: int, landed: list[int], chunks: int
    ) -> None:
        """Unsubscribe the chunks that landed, subscribe the next missing ones (without waiting for the
        SUBACK: a subscription made while disconnected is made again at the reconnection anyway)."""
        for index in landed:
            if index in self._window:
                self._window.discard(index)
                link.off_fleet_subtree(suffix, str(index))
        while len(self._window) < WINDOW and self._following < chunks:
            index = self._following
            self._following += 1
            with self._lock:
                held = index in self._have
            if not held:
                self._window.add(index)
                link.on_fleet_subtree(suffix, self.on_message, max_bytes=max_bytes, level=str(index),
                                      timeout=0)

    def fetch_path(self, source: Path) -> None:
        """Copy from a file the device can read: opened without following links, a regular file of exactly
        the signed size (checked on the descriptor before a byte is copied)."""
        try:
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise CommandRefused("fetch", f"cannot open {source}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise CommandRefused("fetch", f"{source} is not a regular file")
            if st.st_size != self.size:
                raise CommandRefused("digest",
                                     f"{source} has {st.st_size} bytes, the command says {self.size}")
            self._fd = _open_partial(self.path, self.size)
            offset = 0
            while offset < self.size:
                block = os.pread(src, min(_READ, self.size - offset), offset)
                if not block:
                    raise CommandRefused("fetch", f"{source} shrank while it was copied")
                if self._steps.wants("mid-chunk") and offset > 0:
                    os.pwrite(self._fd, block[: len(block) // 2], offset)
                    os.fsync(self._fd)
                    self._steps.at("mid-chunk")
                os.pwrite(self._fd, block, offset)
                offset += len(block)
                if offset >= self.size or offset == _READ:
                    os.fsync(self._fd)
                    self._steps.at("chunk-written")
        except BaseException:
            self._close()
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(src)
        self._finish()

    def _finish(self) -> None:
        try:
            os.fsync(self._fd)
            self._steps.at("fetched")
            digest = sha256_of(self._fd, self.size)
        finally:
            self._close()
        if not hmac.compare_digest(digest, self.sha256):
            self.path.unlink(missing_ok=True)
            raise CommandRefused("digest", f"fetched bundle has SHA-256 {digest[:16]}…, the command names "
                                           f"{self.sha256[:16]}…")

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
