"""The test slowdown factor (tests/support/slowdown.py): the override, its validation, and the measurement."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import slowdown


@pytest.fixture(autouse=True)
def _fresh_factor() -> Iterator[None]:
    slowdown.factor.cache_clear()
    yield
    slowdown.factor.cache_clear()  # the next test measures (or reads the real environment) again


def test_override_scales_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(slowdown.ENV, "12.5")
    assert slowdown.factor() == 12.5 and slowdown.scaled(2.0) == 25.0


@pytest.mark.parametrize("text", ["fast", "0.5", "nan", "inf", "-3", "1e9"])
def test_bad_override_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(slowdown.ENV, text)
    pattern = rf"^{slowdown.ENV}=.* (is not a number|must be within \[1, 1000\])$"
    with pytest.raises(ValueError, match=pattern):
        slowdown.factor()


def test_measured_factor_is_never_below_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(slowdown.ENV, raising=False)
    assert slowdown.factor() >= 1.0


@pytest.mark.parametrize(("runs_s", "expected"), [([0.5, 0.14, 0.3], 20.0), ([0.001] * 3, 1.0)])
def test_measurement_is_the_best_run_against_the_reference(
    monkeypatch: pytest.MonkeyPatch, runs_s: list[float], expected: float
) -> None:
    """A clock that makes each run of the workload take the given times: a machine whose best run is 20x
    the reference measures 20 (one slow run does not count), a faster one measures 1, never less."""
    monkeypatch.setattr(slowdown, "REFERENCE_S", 0.007)
    monkeypatch.setattr(slowdown, "_RUNS", len(runs_s))
    ticks: list[float] = []
    for t in runs_s:
        start = ticks[-1] + 1.0 if ticks else 0.0
        ticks += [start, start + t]
    clock = iter(ticks)
    monkeypatch.setattr(slowdown.time, "perf_counter", lambda: next(clock))
    assert slowdown.measure() == pytest.approx(expected)
