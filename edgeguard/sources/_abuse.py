"""API abuse detection: per-client lockout after bursts of authentication failures, and a per-token
request-rate anomaly detector (docs/security.md, "API abuse: lockout and rate anomalies").

Lockout: a client (the TCP peer's address, or the Unix socket peer's uid) that fails authentication
(401, or 403 for a scope it lacks) ``lockout_failures`` times within ``lockout_window_s`` is locked out: every
request from it is answered 429 with ``Retry-After`` before any token is looked at, so guessing stops costing
the device a comparison (loopback TCP clients, who all share one address, only have their failures answered
so unless ``lockout_loopback``: see ``_api``). The first lockout lasts ``lockout_initial_s``; each further one
within ``lockout_max_s`` of the last doubles, up to ``lockout_max_s`` (exponential backoff).
The table of clients is bounded (``max_clients``; the least recently seen client that is not locked out is
forgotten first).

Rate anomaly: for each token, requests are counted in windows of ``rate_anomaly_window_s``; an exponentially
weighted moving average (EWMA, weight ``_ALPHA`` for the newest window) of the per-window rate is its
baseline. A window whose count exceeds ``rate_anomaly_factor`` times the baseline (and at least
``rate_anomaly_min_requests`` requests) raises an anomaly, after ``_WARMUP`` windows have formed a baseline.
Windows in which a token made no request count as zero, so a token idle for long has a low baseline and a
sudden scrape stands out.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AbuseConfig", "LockoutTable", "RateWatch"]

_ALPHA = 0.2
_WARMUP = 3


@dataclass(frozen=True, kw_only=True)
class AbuseConfig:
    lockout_failures: int = 10  # 0: no lockout
    lockout_window_s: float = 60.0
    lockout_initial_s: float = 30.0
    lockout_max_s: float = 3600.0
    max_clients: int = 4096
    rate_anomaly_factor: float = 5.0  # 0: no rate anomaly detection
    rate_anomaly_window_s: float = 10.0
    rate_anomaly_min_requests: int = 50  # requests in one window below which nothing is an anomaly
    # Lock loopback TCP clients out fully (429) too. Off by default: they all share one address, so a full
    # lockout would let any local user lock out every local application.
    lockout_loopback: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.lockout_failures <= 100_000:
            raise ValueError("lockout_failures must be 0..100000")
        for name, lo, hi in (("lockout_window_s", 0.1, 86400.0), ("lockout_initial_s", 0.1, 86400.0),
                             ("lockout_max_s", self.lockout_initial_s, 7 * 86400.0),
                             ("rate_anomaly_window_s", 0.1, 86400.0)):
            v = getattr(self, name)
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"{name} must be {lo}..{hi} s")
        if not 16 <= self.max_clients <= 1_000_000:
            raise ValueError("max_clients must be 16..1000000")
        factor = self.rate_anomaly_factor
        if not (math.isfinite(factor) and (factor == 0 or 1.5 <= factor <= 1000)):
            raise ValueError("rate_anomaly_factor must be 0 (off) or 1.5..1000")
        if not 1 <= self.rate_anomaly_min_requests <= 10_000_000:
            raise ValueError("rate_anomaly_min_requests must be 1..10000000")


@dataclass
class _Client:
    failures: collections.deque[float]
    locked_until: float = 0.0
    strikes: int = 0  # lockouts so far (backoff exponent)
    last_lockout: float = -math.inf


class LockoutTable:
    """Not thread-safe: used from the API's event loop only."""

    def __init__(self, config: AbuseConfig, *, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._now = now
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self.lockouts = 0
        self.failures = 0
        self.last: dict[str, Any] | None = None

    def retry_after(self, client: str) -> float:
        """Seconds left of ``client``'s lockout (0: not locked out)."""
        c = self._clients.get(client)
        if c is None:
            return 0.0
        return max(0.0, c.locked_until - self._now())

    def failure(self, client: str) -> float:
        """Count a failed authentication; the lockout it starts, in seconds (0: none)."""
        cfg = self.config
        self.failures += 1
        if cfg.lockout_failures == 0:
            return 0.0
        now = self._now()
        c = self._clients.get(client)
        if c is None:
            self._evict()
            c = _Client(collections.deque(maxlen=cfg.lockout_failures))
            self._clients[client] = c
        self._clients.move_to_end(client)
        c.failures.append(now)
        while c.failures and now - c.failures[0] > cfg.lockout_window_s:
            c.failures.popleft()
        if len(c.failures) < cfg.lockout_failures:
            return 0.0
        if now - c.last_lockout > cfg.lockout_max_s:
            c.strikes = 0  # well-behaved for long: start the backoff over
        seconds = min(cfg.lockout_initial_s * 2.0 ** min(c.strikes, 40), cfg.lockout_max_s)
        c.strikes += 1
        c.last_lockout = now
        c.locked_until = now + seconds
        c.failures.clear()
        self.lockouts += 1
        return seconds

    def locked_clients(self) -> int:
        now = self._now()
        return sum(1 for c in self._clients.values() if c.locked_until > now)

    def _evict(self) -> None:
        if len(self._clients) < self.config.max_clients:
            return
        now = self._now()
        for key, c in self._clients.items():
            if c.locked_until <= now:
                del self._clients[key]
                return
        self._clients.popitem(last=False)  # all locked out: forget the oldest rather than grow


@dataclass
class _Rate:
    start: float
    count: int = 0
    ewma: float = 0.0
    windows: int = 0


class RateWatch:
    """Per-token request-rate anomaly detection (event loop only). :meth:`hit` returns an anomaly's details
    when a window just closed as anomalous."""

    def __init__(self, config: AbuseConfig, *, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._now = now
        self._tokens: dict[str, _Rate] = {}  # bounded by the tokens file (at most MAX_TOKENS names)
        self.anomalies = 0

    def hit(self, token: str) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.rate_anomaly_factor == 0:
            return None
        now = self._now()
        r = self._tokens.get(token)
        if r is None:
            r = self._tokens[token] = _Rate(start=now)
        found = None
        if now - r.start >= cfg.rate_anomaly_window_s:
            self._close(r)
            elapsed = int((now - r.start) // cfg.rate_anomaly_window_s)
            for _ in range(min(elapsed - 1, 50)):  # idle windows count as zero requests
                r.ewma = (1 - _ALPHA) * r.ewma
                r.windows += 1
            r.start += elapsed * cfg.rate_anomaly_window_s
            r.count = 0
        r.count += 1
        # Also judged while the window is still open: a scrape is seen within one window, not after it.
        if found is None and r.windows >= _WARMUP and r.count == self._limit(r) + 1:
            found = self._anomaly(token, r, float(r.count))
        return found

    def _limit(self, r: _Rate) -> int:
        base = r.ewma * self.config.rate_anomaly_window_s
        cfg = self.config
        return max(cfg.rate_anomaly_min_requests, math.ceil(cfg.rate_anomaly_factor * base))

    def _close(self, r: _Rate) -> None:
        rate = r.count / self.config.rate_anomaly_window_s
        r.ewma = rate if r.windows == 0 else (1 - _ALPHA) * r.ewma + _ALPHA * rate
        r.windows += 1

    def _anomaly(self, token: str, r: _Rate, count: float) -> dict[str, Any]:
        self.anomalies += 1
        return {
            "token_name": token,
            "requests": int(count),
            "window_s": self.config.rate_anomaly_window_s,
            "baseline_per_s": round(r.ewma, 3),
            "factor": self.config.rate_anomaly_factor,
        }
