"""A watched directory: files dropped by a camera (or any) process, the only reader of those files.

Polling (not inotify, which the standard library lacks and which misses files on some network filesystems).
A file is taken only once it is complete: a regular file (no symlinks: they could point anywhere), not hidden
and not ``*.part``/``*.tmp``, whose size and mtime did not change between two polls at least ``settle_s``
apart. The best producer writes ``name.part`` and renames it; the settle check covers producers that do not.

After processing the file moves to ``done/`` (with ``<name>.result.json`` holding the result id) or to
``failed/`` (with ``<name>.error.txt`` holding the one-line reason). Delivery is at-least-once: a worker
killed between storing the result and moving the file processes it again after the restart.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write
from edgeguard._echo import cut, echo
from edgeguard._safeio import open_checked
from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import EdgeGuardError, InputRejected, ServiceUnavailable

from ._request import BodyLimits, InferenceSink, parse_body

__all__ = ["DirectoryConfig", "DirectorySource", "CONTENT_TYPES"]

_log = logging.getLogger("edgeguard.sources.directory")

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".npy": "application/x-npy",
    ".json": "application/json",
}
_PARTIAL_SUFFIXES = (".part", ".tmp", ".partial", "~")


@dataclass(frozen=True, kw_only=True)
class DirectoryConfig:
    path: Path
    poll_s: float = 0.5
    settle_s: float = 1.0  # unchanged for this long => complete
    max_file_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0.01 <= self.poll_s <= 60:
            raise ValueError("poll_s must be 0.01..60")
        if not 0 <= self.settle_s <= 600:
            raise ValueError("settle_s must be 0..600")
        if not 64 <= self.max_file_bytes <= 1024**3:
            raise ValueError("max_file_bytes must be 64 B .. 1 GiB")


class DirectorySource:
    name = "directory"

    def __init__(
        self,
        *,
        config: DirectoryConfig,
        sink: InferenceSink,
        specs: Callable[[], Sequence[TensorSpec]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._sink = sink
        self._specs = specs
        self._clock = clock
        self._limits = BodyLimits(max_body_bytes=config.max_file_bytes)
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen unchanged)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = {"done": 0, "failed": 0, "deferred": 0, "errors": 0}
        self.last_error = ""
        self.done_dir = config.path / "done"
        self.failed_dir = config.path / "failed"

    def prepare(self) -> None:
        for d in (self.config.path, self.done_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.prepare()
        self._thread = threading.Thread(target=self._run, name="eg-directory", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def dead(self) -> bool:
        """The polling thread ended without being stopped: health and the heartbeat show it (degraded)."""
        return self._thread is not None and not self._thread.is_alive() and not self._halt.is_set()

    def _run(self) -> None:
        # Nothing a file can do may end this loop: a thread that died here would leave every later file
        # unprocessed while health still looked fine. A failed poll is logged, counted and retried.
        while not self._halt.is_set():
            try:
                self.poll_once()
            except Exception as exc:
                self.counts["errors"] += 1
                self.last_error = cut(f"{type(exc).__name__}: {exc}")
                _log.warning("watched directory %s: %s", self.config.path, self.last_error)
            self._halt.wait(self.config.poll_s)

    def poll_once(self) -> int:
        """Process every file that is complete now; returns how many were processed."""
        now = self._clock()
        present: set[str] = set()
        ready: list[str] = []
        with os.scandir(self.config.path) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or name.endswith(_PARTIAL_SUFFIXES):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    if stat.S_ISLNK(st.st_mode):
                        self._fail(name, "symbolic links are not followed")
                    continue
                present.add(name)
                key = (st.st_size, st.st_mtime_ns)
                prev = self._seen.get(name)
                if prev is None or prev[:2] != key:
                    self._seen[name] = (*key, now)
                    continue
                if now - prev[2] >= self.config.settle_s:
                    ready.append(name)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        processed = 0
        for name in sorted(ready):
            if self._halt.is_set():
                break
            if self._process(name):
                processed += 1
            self._seen.pop(name, None)
        return processed

    def _process(self, name: str) -> bool:
        path = self.config.path / name
        suffix = path.suffix.lower()
        ctype = CONTENT_TYPES.get(suffix)
        if ctype is None:
            self._fail(name, f"unsupported file type {echo(suffix or '(none)')}")
            return True
        try:
            body = self._read(path)
            request = parse_body(
                body=body,
                content_type=ctype,
                specs=self._specs(),
                source="directory",
                limits=self._limits,
                correlation_id=_printable(name)[:128] or None,
            )
            result = self._sink(request)
        except ServiceUnavailable as exc:
            self.counts["deferred"] += 1  # leave it in place; the next poll tries again
            _log.info("deferring %s: %s", echo(name), cut(exc))
            return False
        except (InputRejected, EdgeGuardError) as exc:
            self._fail(name, str(exc))
            return True
        except OSError as exc:
            self._fail(name, f"cannot read: {exc.strerror}")
            return True
        except Exception as exc:  # a bug or MemoryError: this file fails, the source keeps serving the rest
            _log.exception("watched file %s: unexpected failure", echo(name))
            self._fail(name, f"internal error ({type(exc).__name__}; see the device log)")
            return True
        dest = _unique(self.done_dir / name)
        _write_text(dest.with_name(dest.name + ".result.json"), json.dumps({"id": result.get("id")}) + "\n")
        os.replace(path, dest)
        self.counts["done"] += 1
        return True

    def _read(self, path: Path) -> bytes:
        """The file's bytes, read from one descriptor that was checked: the scan's lstat is only a hint,
        since the producer (or anyone who can write the directory) may swap the file for a link to
        ``/dev/zero`` or a FIFO before this runs. At most the limit is read, whatever the file grows to."""
        limit = self.config.max_file_bytes
        fd, st = open_checked(path, what="watched file", error=InputRejected)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > limit:
                raise InputRejected(f"file of {st.st_size} bytes exceeds the limit of {limit}")
            body = f.read(limit + 1)
        if len(body) > limit:
            raise InputRejected(f"file grew past the limit of {limit} bytes while being read")
        return body

    def _fail(self, name: str, reason: str) -> None:
        reason = cut(reason)
        _log.warning("watched file %s failed: %s", echo(name), reason)
        dest = _unique(self.failed_dir / name)
        try:
            _write_text(dest.with_name(dest.name + ".error.txt"), reason + "\n")
            os.replace(self.config.path / name, dest)
        except OSError as exc:
            _log.warning("cannot move %s to failed/: %s", echo(name), exc)
        self.counts["failed"] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counts,
            "pending": len(self._seen),
            "alive": not self.dead,
            "last_error": self.last_error,
        }


def _printable(name: str) -> str:
    # A file name may hold any byte but / and NUL; a correlation id must be printable.
    return "".join(c for c in name if c.isprintable())


def _unique(dest: Path) -> Path:
    if not dest.exists():
        return dest
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for i in range(1000):
        candidate = dest.with_name(f"{dest.stem}.{stamp}.{i}{dest.suffix}")
        if not candidate.exists():
            return candidate
    return dest


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"), mode=0o644)
