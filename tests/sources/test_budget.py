"""Per-token query budgets on a controlled clock: the bucket, the window, the persisted state and the worst
case assumed after an unclean stop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeguard.sources._budget import STATE_FILE, BudgetConfig, BudgetLimits, QueryBudgets


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _cfg(**kw: object) -> BudgetConfig:
    limits = BudgetLimits(rate_per_s=float(kw.pop("rate", 0.0)),  # type: ignore[arg-type]
                          burst=int(kw.pop("burst", 0)),  # type: ignore[call-overload]
                          window_queries=int(kw.pop("window", 0)))  # type: ignore[call-overload]
    return BudgetConfig(default=limits, **kw)  # type: ignore[arg-type]


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = Clock()
    b = QueryBudgets(_cfg(rate=2.0, burst=5), state_path=None, now=clock)
    assert [b.take("app").ok for _ in range(6)] == [True] * 5 + [False]
    refused = b.take("app")
    assert refused.retry_after == 1 and "rate limit of token 'app'" in refused.reason
    clock.t += 0.5  # one query's worth at 2/s
    assert b.take("app").ok and not b.take("app").ok
    assert b.take("other").ok  # every token has a bucket of its own
    assert b.rate_limited == 3


def test_window_budget_refuses_until_the_next_window_and_reports_exhaustion_once() -> None:
    clock = Clock(86400.0 * 100 + 3600.0)  # one hour into a day window
    b = QueryBudgets(_cfg(window=3), state_path=None, now=clock)
    decisions = [b.take("app") for _ in range(3)]
    assert all(d.ok for d in decisions)
    assert [d.exhausted_now for d in decisions] == [False, False, True]
    assert decisions[2].detail["token_name"] == "app" and decisions[2].detail["window_queries"] == 3
    refused = b.take("app")
    assert not refused.ok and refused.retry_after == 86400 - 3600 and "query budget" in refused.reason
    assert not b.take("app").exhausted_now and b.exhaustions == 1
    clock.t += 86400 - 3600  # the next window
    assert b.take("app").ok
    assert b.snapshot()["tokens"][0] == {"token_name": "app", "used": 1, "window_queries": 3, "bucket": None}


def test_per_token_limits_override_the_default() -> None:
    clock = Clock()
    cfg = BudgetConfig(default=BudgetLimits(window_queries=1),
                       tokens={"bulk": BudgetLimits(window_queries=5), "free": BudgetLimits()})
    b = QueryBudgets(cfg, state_path=None, now=clock)
    assert [b.take("app").ok for _ in range(2)] == [True, False]
    assert [b.take("bulk").ok for _ in range(6)] == [True] * 5 + [False]
    assert all(b.take("free").ok for _ in range(100))


def test_clean_restart_keeps_exact_counts(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / STATE_FILE
    cfg = _cfg(window=10, persist_every_queries=100)
    b = QueryBudgets(cfg, state_path=path, now=clock)
    for _ in range(4):
        assert b.take("app").ok
    b.persist(clean=True)
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = QueryBudgets(cfg, state_path=path, now=clock)
    assert [again.take("app").ok for _ in range(7)] == [True] * 6 + [False]


def test_unclean_stop_charges_the_unwritten_worst_case(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / STATE_FILE
    cfg = _cfg(window=20, persist_every_queries=5)
    b = QueryBudgets(cfg, state_path=path, now=clock)
    for _ in range(7):  # the 5th query wrote the state; 2 are unwritten when the process dies
        assert b.take("app").ok
    assert b.writes == 1
    # kill -9: no clean write. The next start assumes 4 (persist_every_queries - 1) unwritten queries.
    again = QueryBudgets(cfg, state_path=path, now=clock)
    allowed = sum(again.take("app").ok for _ in range(30))
    assert allowed == 20 - 5 - 4  # never more than the true remainder (13)
    # A token never written before is charged too: it may have been used after the last write.
    assert sum(again.take("new").ok for _ in range(30)) == 20 - 4


def test_bucket_state_survives_a_restart_and_time_away_refills_it(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / STATE_FILE
    cfg = _cfg(rate=1.0, burst=3)
    b = QueryBudgets(cfg, state_path=path, now=clock)
    assert [b.take("app").ok for _ in range(4)] == [True, True, True, False]
    b.persist(clean=True)
    again = QueryBudgets(cfg, state_path=path, now=clock)
    assert not again.take("app").ok  # no fresh burst from a restart
    clock.t += 2.0
    assert [again.take("app").ok for _ in range(3)] == [True, True, False]
    clock.t -= 1000.0  # clock set back: nothing refills
    assert not again.take("app").ok


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other"}', b"x" * (600 * 1024),
                                     b'{"format": "edgeguard-query-budgets/1", "clean": true, '
                                     b'"window_s": 86400.0, "tokens": {"a": [1, 2, "x", 4, false]}}'])
def test_unusable_state_is_reported_and_the_worst_case_assumed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    b = QueryBudgets(_cfg(window=10, persist_every_queries=4), state_path=path, now=Clock())
    assert b.state_problem is not None and "\n" not in b.state_problem
    assert sum(b.take("app").ok for _ in range(20)) == 10 - 3


def test_a_linked_state_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"format": "edgeguard-query-budgets/1", "clean": True, "window_s": 86400.0,
                                  "tokens": {}}))
    path = tmp_path / STATE_FILE
    path.symlink_to(target)
    b = QueryBudgets(_cfg(window=10), state_path=path, now=Clock())
    assert b.state_problem is not None and "symbolic link" in b.state_problem


def test_state_is_bounded(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / STATE_FILE
    b = QueryBudgets(_cfg(window=10, max_tracked=16), state_path=path, now=clock)
    for i in range(100):
        b.take(f"t{i}")
    b.persist(clean=True)
    assert len(json.loads(path.read_text())["tokens"]) == 16


@pytest.mark.parametrize(("kw", "message"), [
    ({"window_s": 0.0}, "window_s"),
    ({"persist_every_queries": 0}, "persist_every_queries"),
    ({"max_tracked": 1}, "max_tracked"),
])
def test_bad_limits_are_value_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BudgetConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_per_s"):
        BudgetLimits(rate_per_s=-1.0)
    with pytest.raises(ValueError, match="burst needs"):
        BudgetLimits(burst=3)


def test_no_limits_take_nothing_and_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    b = QueryBudgets(BudgetConfig(), state_path=path, now=Clock())
    assert all(b.take("app").ok for _ in range(1000))
    b.persist(clean=True)
    assert not path.exists()
