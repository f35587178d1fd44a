"""Per-token query budgets for the local API: a token bucket (rate + burst) and a budget per longer window
(queries per day), persisted so that a restart, even ``kill -9``, does not hand out a fresh budget
(docs/security.md, "Query budgets and rate limits").

Model extraction needs many queries; these limits make it slow (the bucket) and bounded (the window). The
bucket holds up to ``burst`` queries and refills at ``rate_per_s``; the window budget allows
``window_queries`` per window of ``window_s`` seconds, windows aligned to the epoch (a day budget resets at
00:00 UTC). A query takes one from both; when either is empty the request is answered 429 with the seconds
until it would succeed in ``Retry-After``.

Persistence (``<state_dir>/query-budgets.json``, atomic, bounded, read without following links): written
when ``persist_every_queries`` queries were taken since the last write, every ``persist_interval_s`` by the
owner's timer while something changed, and at shutdown, marked ``clean``. The write on the N-th query is
synchronous, so at most ``persist_every_queries - 1`` queries are ever unwritten. After an unclean stop
(``kill -9``, power cut) the worst case is assumed: each token is charged ``persist_every_queries - 1``
queries more, on its bucket and its window, the first time it is seen. Bucket levels are stored with the
time they were taken; the time away refills them (never past ``burst``), and a clock set back refills
nothing.

The API's event loop owns one :class:`QueryBudgets` and is the only caller of :meth:`QueryBudgets.take` and
:meth:`QueryBudgets.persist`; :meth:`QueryBudgets.snapshot` may be called from another thread (the heartbeat).
The write on the N-th query runs on the event loop (one fsync every ``persist_every_queries`` queries): that
keeps the bound above exact; raise ``persist_every_queries`` where queries are many and storage is slow.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked

__all__ = ["BudgetLimits", "BudgetConfig", "BudgetDecision", "QueryBudgets", "STATE_FILE"]

_log = logging.getLogger("edgeguard.sources.budget")

STATE_FILE = "query-budgets.json"
_FORMAT = "edgeguard-query-budgets/1"
_MAX_STATE_BYTES = 512 * 1024  # max_tracked entries of ~120 bytes, with room


@dataclass(frozen=True, kw_only=True)
class BudgetLimits:
    """The limits of one token (or the default for every token)."""

    rate_per_s: float = 0.0  # bucket refill; 0: no rate limit
    burst: int = 0  # bucket size; 0: max(1, ceil(rate_per_s))
    window_queries: int = 0  # queries per window; 0: no window budget

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and 0 <= self.rate_per_s <= 1_000_000):
            raise ValueError("rate_per_s must be 0 (off) .. 1000000")
        if not 0 <= self.burst <= 10_000_000:
            raise ValueError("burst must be 0..10000000")
        if self.burst and not self.rate_per_s:
            raise ValueError("burst needs a rate_per_s")
        if not 0 <= self.window_queries <= 1_000_000_000:
            raise ValueError("window_queries must be 0 (off) .. 1000000000")

    @property
    def bucket_size(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate_per_s)))

    @property
    def limited(self) -> bool:
        return self.rate_per_s > 0 or self.window_queries > 0


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    default: BudgetLimits = field(default_factory=BudgetLimits)
    tokens: Mapping[str, BudgetLimits] = field(default_factory=dict)  # by token name
    window_s: float = 86400.0
    persist_interval_s: float = 10.0
    persist_every_queries: int = 100
    max_tracked: int = 1024  # token names kept in memory and on disk (the least recently used go first)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_s) and 1.0 <= self.window_s <= 366 * 86400.0):
            raise ValueError("window_s must be 1..31622400 s")
        if not (math.isfinite(self.persist_interval_s) and 0.1 <= self.persist_interval_s <= 3600.0):
            raise ValueError("persist_interval_s must be 0.1..3600 s")
        if not 1 <= self.persist_every_queries <= 1_000_000:
            raise ValueError("persist_every_queries must be 1..1000000")
        if not 16 <= self.max_tracked <= 100_000:
            raise ValueError("max_tracked must be 16..100000")
        if len(self.tokens) > self.max_tracked:
            raise ValueError(f"at most {self.max_tracked} tokens may have limits of their own")

    @property
    def enabled(self) -> bool:
        return self.default.limited or any(t.limited for t in self.tokens.values())

    def limits(self, token: str) -> BudgetLimits:
        return self.tokens.get(token, self.default)


@dataclass(frozen=True)
class BudgetDecision:
    ok: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused
    reason: str = ""
    exhausted_now: bool = False  # the window budget ran out with this request (first time in this window)
    detail: Mapping[str, Any] = field(default_factory=dict)


_ALLOWED = BudgetDecision(ok=True)


@dataclass
class _State:
    level: float  # queries left in the bucket
    at: float  # wall time of ``level``
    window: int  # index of the window ``used`` counts in
    used: int  # queries taken in that window
    exhausted: bool = False  # the exhaustion event for this window was raised
    charged: bool = False  # the unclean-stop charge was applied


class QueryBudgets:
    """The budgets of every token; ``now`` is the wall clock (the service passes its trusted clock)."""

    def __init__(
        self, config: BudgetConfig, *, state_path: Path | None, now: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._path = state_path
        self._now = now
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._unwritten = 0  # queries taken since the last write
        self._dirty = False
        self._unclean = False  # the last run did not shut down cleanly: charge the worst case
        self.rate_limited = 0  # 429s because the bucket was empty
        self.budget_refused = 0  # 429s because the window budget was used up
        self.exhaustions = 0  # tokens that ran out of their window budget (once per token and window)
        self.state_problem: str | None = None
        self.writes = 0
        if state_path is not None and config.enabled:
            self._load(state_path)

    # -- the decision ------------------------------------------------------------------------------
    def take(self, token: str) -> BudgetDecision:
        """Take one query for ``token``, or say why not and for how long."""
        limits = self.config.limits(token)
        if not limits.limited:
            return _ALLOWED
        now = self._now()
        s = self._state(token, limits, now)
        self._refill(s, limits, now)
        window_s = self.config.window_s
        if limits.window_queries and s.used >= limits.window_queries:
            self.budget_refused += 1
            retry = max(1, math.ceil((s.window + 1) * window_s - now))
            why = (f"query budget of token {token!r} used up: {limits.window_queries} queries per "
                   f"{window_s:g} s; retry in {retry} s")
            return BudgetDecision(ok=False, retry_after=retry, reason=why)
        if limits.rate_per_s and s.level < 1.0:
            self.rate_limited += 1
            retry = max(1, math.ceil((1.0 - s.level) / limits.rate_per_s))
            why = (f"rate limit of token {token!r}: {limits.rate_per_s:g} queries/s, burst "
                   f"{limits.bucket_size:g}; retry in {retry} s")
            return BudgetDecision(ok=False, retry_after=retry, reason=why)
        if limits.rate_per_s:
            s.level -= 1.0
        s.used += 1
        self._dirty = True
        self._unwritten += 1
        exhausted = bool(limits.window_queries and s.used >= limits.window_queries and not s.exhausted)
        detail: dict[str, Any] = {}
        if exhausted:
            s.exhausted = True
            self.exhaustions += 1
            detail = {"token_name": token, "window_queries": limits.window_queries, "window_s": window_s,
                      "window_ends": (s.window + 1) * window_s}
        if self._unwritten >= self.config.persist_every_queries:
            self.persist()  # synchronous: at most persist_every_queries - 1 queries are ever unwritten
        return BudgetDecision(ok=True, exhausted_now=exhausted, detail=detail) if exhausted else _ALLOWED

    def _state(self, token: str, limits: BudgetLimits, now: float) -> _State:
        s = self._states.get(token)
        if s is None:
            if len(self._states) >= self.config.max_tracked:
                self._states.popitem(last=False)
            s = _State(level=limits.bucket_size, at=now, window=self._window(now), used=0)
            self._states[token] = s
        else:
            self._states.move_to_end(token)
        if self._unclean and not s.charged:
            # Queries this token may have taken after the last write before an unclean stop: assume all.
            worst = self.config.persist_every_queries - 1
            s.level -= worst
            s.used += worst
            s.charged = True
            self._dirty = True
        return s

    def _window(self, now: float) -> int:
        return int(now // self.config.window_s)

    def _refill(self, s: _State, limits: BudgetLimits, now: float) -> None:
        window = self._window(now)
        if window > s.window:  # a new window; a clock set back keeps the window it was in
            s.window, s.used, s.exhausted = window, 0, False
            self._dirty = True
        elapsed = now - s.at
        if elapsed > 0:
            s.level = min(limits.bucket_size, s.level + elapsed * limits.rate_per_s)
            s.at = now
        # elapsed < 0 (clock set back): nothing refills until the clock has passed ``at`` again

    # -- figures -----------------------------------------------------------------------------------
    def snapshot(self, *, top: int = 16) -> dict[str, Any]:
        """Counts for the heartbeat and health: totals, and the ``top`` tokens that used most this window."""
        now = self._now()
        window = self._window(now)
        rows: list[tuple[int, str, int, float | None]] = []  # used, name, window budget, bucket level
        exhausted = 0
        # The heartbeat asks from the link's thread while the event loop takes queries: copy first (one
        # C-level pass under the GIL), never iterate the live table.
        for name, s in list(self._states.items()):
            limits = self.config.limits(name)
            used = s.used if s.window == window else 0
            exhausted += bool(limits.window_queries and used >= limits.window_queries)
            level = round(max(s.level, 0.0), 2) if limits.rate_per_s else None
            rows.append((used, name, limits.window_queries, level))
        rows.sort(key=lambda r: (-r[0], r[1]))
        return {
            "enabled": self.config.enabled,
            "window_s": self.config.window_s,
            "rate_limited": self.rate_limited,
            "budget_refused": self.budget_refused,
            "exhausted_tokens": exhausted,
            "exhaustions": self.exhaustions,
            "state_problem": self.state_problem,
            "tokens": [{"token_name": n, "used": u, "window_queries": w, "bucket": b}
                       for u, n, w, b in rows[:top]],
        }

    # -- persistence -------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._dirty

    def persist(self, *, clean: bool = False) -> None:
        """Write the state now (``clean``: at shutdown, no worst case to assume at the next start)."""
        if self._path is None or not self.config.enabled:
            return
        doc = {
            "format": _FORMAT,
            "clean": clean,
            "window_s": self.config.window_s,
            "tokens": {n: [round(s.level, 4), s.at, s.window, s.used, s.exhausted]
                       for n, s in self._states.items()},
        }
        try:
            atomic_write(self._path, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exc:  # a full disk must not stop answering: counted, reported, retried
            self.state_problem = f"cannot write {self._path.name}: {exc.strerror or exc}"
            _log.warning("query budgets: %s", self.state_problem)
            return
        self.writes += 1
        self._unwritten = 0
        self._dirty = False

    def _load(self, path: Path) -> None:
        try:
            data = read_checked(path, what="query budget state", limit=_MAX_STATE_BYTES, error=OSError).data
        except FileNotFoundError:
            return  # first start: nothing taken yet
        except OSError as exc:  # a link, a directory, oversized, unreadable
            self._refuse_state(f"{path}: {exc.strerror or exc}")
            return
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError("not a query budget state file")
            tokens = doc["tokens"]
            if not isinstance(tokens, dict) or not isinstance(doc.get("clean"), bool):
                raise ValueError("malformed")
            same_windows = doc.get("window_s") == self.config.window_s
            states: OrderedDict[str, _State] = OrderedDict()
            for name, row in list(tokens.items())[-self.config.max_tracked:]:
                level, at, window, used, exhausted = row
                if not (isinstance(name, str) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                      for v in (level, at, window, used))
                        and isinstance(exhausted, bool)):
                    raise ValueError(f"malformed entry for {name[:64]!r}")
                # Another window length: the counts mean nothing in the new windows; keep them in the current
                # one (the conservative choice: no fresh budget from editing the config).
                win = int(window) if same_windows else self._window(self._now())
                states[name] = _State(level=float(level), at=float(at), window=win, used=int(used),
                                      exhausted=bool(exhausted))
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse_state(f"{path}: {str(exc)[:200]}")
            return
        self._states = states
        self._unclean = not doc["clean"]

    def _refuse_state(self, why: str) -> None:
        # The state cannot be trusted: assume the worst an unclean stop can hide, for every token.
        self.state_problem = f"query budget state unusable, worst case assumed: {why}"
        _log.warning("%s", self.state_problem)
        self._unclean = True


def default_state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE
