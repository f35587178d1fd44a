"""Latency window for p50/p99 in the heartbeat: a fixed-size ring, never grows."""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["LatencyWindow"]


class LatencyWindow:
    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._buf[self._n % self._buf.size] = ms
            self._n += 1

    def percentiles(self) -> dict[str, float | None]:
        with self._lock:
            filled = self._buf[: min(self._n, self._buf.size)].copy()
        if filled.size == 0:
            return {"p50": None, "p99": None}
        p50, p99 = np.percentile(filled, [50, 99])
        return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
