"""Keeping plaintext models and keys out of core dumps, swap and other processes' reach.

Two layers (docs/security.md, "Core dumps, ptrace and swap"):

* the process: :func:`harden_process` sets ``RLIMIT_CORE`` to 0 (soft and hard, so no library can raise it
  again) and clears the "dumpable" flag with ``prctl(PR_SET_DUMPABLE, 0)``. A non-dumpable process gets no
  core file whatever the limit, ``core_pattern`` or systemd-coredump say, and the kernel refuses
  ``ptrace`` and ``/proc/<pid>/mem`` reads from any process without ``CAP_SYS_PTRACE``, same user included
  (proc(5), "/proc/pid/mem"; prctl(2), PR_SET_DUMPABLE). It also makes ``/proc/<pid>/*`` owned by root.
* the buffers: :func:`protect` marks the pages of a plaintext buffer ``MADV_DONTDUMP`` (left out of any
  core, should one still be written by a kernel feature we did not foresee) and ``mlock``\\ s them where
  ``RLIMIT_MEMLOCK`` allows, so they are never written to swap. When the limit is too small the buffer stays
  unlocked and :func:`memory_protection` says so (doctor, heartbeat, scan).

The buffers stay ``bytearray``\\ s, as the engine and both backends take them without a copy: the pages
that hold the buffer's storage are marked in place. glibc serves a buffer of this size from its own
mapping, so rounding the range out to whole pages touches at most the allocator's header page; for a small
buffer on the heap, neighbouring heap pages are excluded from dumps too and locked until :func:`release`,
which is harmless. Python copies the runtime cannot see (a backend's own copy of the model, the content key
in OpenSSL) are covered by the process layer only: no core at all, no ptrace.

Off Linux (or without ``prctl``/``madvise``), every function is a documented no-op that reports
``supported: false``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ProcessHardening",
    "harden_process",
    "process_hardening",
    "protect",
    "release",
    "memory_protection",
]

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)
_PAGE = mmap.PAGESIZE
_LINUX = sys.platform.startswith("linux")


def _libc() -> Any:
    if not _LINUX:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a loadable libc
        return None


_LIBC = _libc()


@dataclass(frozen=True)
class ProcessHardening:
    """What the kernel says about this process now (read back, not what was asked for)."""

    supported: bool
    dumpable: bool | None  # None: unknown (no prctl)
    core_limit: int | None  # soft RLIMIT_CORE in bytes; -1 is unlimited
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.dumpable is False and self.core_limit == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "supported": self.supported,
            "dumpable": self.dumpable,
            "core_limit": self.core_limit,
            "errors": list(self.errors),
        }


def _limit(value: int) -> int:
    return -1 if value == resource.RLIM_INFINITY else int(value)


def process_hardening() -> ProcessHardening:
    """Read the dumpable flag and the core limit of this process."""
    core = _limit(resource.getrlimit(resource.RLIMIT_CORE)[0])
    if _LIBC is None:
        return ProcessHardening(supported=False, dumpable=None, core_limit=core)
    dumpable = int(_LIBC.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
    return ProcessHardening(supported=True, dumpable=None if dumpable < 0 else dumpable != 0, core_limit=core)


def harden_process(*, lock_core_limit: bool = True) -> ProcessHardening:
    """No core dumps, no ptrace or ``/proc/<pid>/mem`` by other processes: call before any secret is read.

    ``lock_core_limit`` lowers the hard core limit too, so nothing in this process can raise it again (the
    worker). CLI commands pass False: they may run inside a longer-lived program (a script, a test run)
    whose later children must keep the right to set their own limit; the process itself is non-dumpable
    either way, which alone stops every core dump.

    Idempotent and cheap (two system calls). Failures are reported in the result, never raised: the caller
    decides whether to go on (the service reports them in its heartbeat and the scan).
    """
    errors: list[str] = []
    try:
        hard = 0 if lock_core_limit else resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ValueError, OSError) as exc:
        errors.append(f"RLIMIT_CORE: {exc}")
    if _LIBC is not None and _LIBC.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errors.append(f"prctl(PR_SET_DUMPABLE): {os.strerror(ctypes.get_errno())}")
    state = process_hardening()
    return ProcessHardening(
        supported=state.supported, dumpable=state.dumpable, core_limit=state.core_limit, errors=tuple(errors)
    )


# --- buffers ---------------------------------------------------------------------------------------------


class _Ledger:
    """The page ranges this process protected, so release() unlocks exactly those and the heartbeat can
    say how much is locked, and why something is not."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.regions: dict[int, tuple[int, bool]] = {}  # start address -> (length, locked)
        self.last_failure: str | None = None


_LEDGER = _Ledger()


def _span(buf: bytearray) -> tuple[int, int]:
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    start = address - address % _PAGE
    end = -(-(address + len(buf)) // _PAGE) * _PAGE
    return start, end - start


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def protect(buf: bytearray) -> bool:
    """Mark ``buf``'s pages DONTDUMP and lock them in RAM; True when they are locked.

    ``buf`` must not be resized until :func:`release` (its storage would move). A buffer that cannot be
    locked (RLIMIT_MEMLOCK too small) is still marked DONTDUMP; the reason is kept for
    :func:`memory_protection`.
    """
    if _LIBC is None or not buf:
        return False
    start, length = _span(buf)
    with _LEDGER.lock:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTDUMP)
        locked = _LIBC.mlock(ctypes.c_void_p(start), ctypes.c_size_t(length)) == 0
        _LEDGER.regions[start] = (length, locked)
        if locked:
            return True
        err = ctypes.get_errno()
        limit = _limit(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
        if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
            why = "RLIMIT_MEMLOCK is " + ("unlimited" if limit < 0 else _mib(limit))
        else:
            why = os.strerror(err)
        _LEDGER.last_failure = f"a {_mib(len(buf))} plaintext buffer is not locked in RAM ({why})"
        return False


def release(buf: bytearray) -> None:
    """Unlock ``buf``'s pages (call after wiping it, before it is freed). Safe to call more than once."""
    if _LIBC is None or not buf:
        return
    start, length = _span(buf)
    with _LEDGER.lock:
        region = _LEDGER.regions.pop(start, None)
        if region is not None and region[1]:
            _LIBC.munlock(ctypes.c_void_p(start), ctypes.c_size_t(length))


def memory_protection() -> dict[str, Any]:
    """For doctor, the heartbeat and the scan: the process state and what happened to plaintext buffers."""
    memlock = _limit(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
    with _LEDGER.lock:
        regions = list(_LEDGER.regions.values())
        failure = _LEDGER.last_failure
    return {
        **process_hardening().to_json(),
        "memlock_limit": memlock,
        "locked_bytes": sum(n for n, locked in regions if locked),
        "unlocked_bytes": sum(n for n, locked in regions if not locked),
        # Sticky: once a plaintext buffer could not be locked, the heartbeat keeps saying so.
        "mlock": "ok" if failure is None else failure,
    }
