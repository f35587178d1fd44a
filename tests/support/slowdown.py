"""How much slower this machine runs Python than the one the tests' time bounds were set on.

Time bounds in tests (recovery within N seconds, a restart before a deadline) were measured on a 2-vCPU
x86-64 machine. On an emulated arm64 root (tools/arm64.sh: qemu-user, ~10x slower) or a real slow board
(Pi Zero 2 W) the same code honestly takes longer. Rather than loosening every bound for everyone, a test
scales only the part of a bound that is the machine's work with ``scaled(seconds)``; configured durations
(a hang timeout, a back-off) stay as they are, since the code waits for them by the clock, not by CPU.

The factor is ``EDGEGUARD_TEST_SLOWDOWN`` when set (a number >= 1; tools/arm64.sh passes it through), else it
is measured once per process: the best of several runs of a fixed pure-Python workload against the time it
took on the reference machine. It is never below 1, so a fast machine keeps the bounds as written.
"""

from __future__ import annotations

import functools
import os
import time

__all__ = ["REFERENCE_S", "factor", "scaled"]

ENV = "EDGEGUARD_TEST_SLOWDOWN"
# Best of 9 runs of _workload() on the reference machine, idle (2-vCPU AMD EPYC, CPython 3.11, 2026-11-29:
# 6.9-7.1 ms; 14.5 ms with a load average of 11).
REFERENCE_S = 0.007
_RUNS = 7  # the best of several runs: a busy moment makes one run slow, not the fastest


def _workload() -> int:
    """Dict and integer work, the interpreter's bread and butter (what emulation slows most)."""
    d: dict[int, int] = {}
    for i in range(100_000):
        k = i % 977
        d[k] = d.get(k, 0) + i * 3
    return len(d)


def measure() -> float:
    """This machine's slowdown against the reference, measured now (>= 1)."""
    best = float("inf")
    for _ in range(_RUNS):
        t0 = time.perf_counter()
        _workload()
        best = min(best, time.perf_counter() - t0)
    return max(1.0, best / REFERENCE_S)


@functools.cache
def factor() -> float:
    """The slowdown factor: ``EDGEGUARD_TEST_SLOWDOWN`` if set, else measured once (never below 1)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return measure()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r} is not a number") from None
    if not 1.0 <= value <= 1000.0:  # also refuses nan and inf
        raise ValueError(f"{ENV}={text!r} must be within [1, 1000]")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` of this machine's work as measured on the reference machine, on this machine."""
    return seconds * factor()
