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


def test_measured_factor_is_never_below_one_and_tracks_a_slower_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(slowdown.ENV, raising=False)
    assert slowdown.factor() >= 1.0
    # A machine 20x slower than the reference: the same workload measures 20x the reference time.
    monkeypatch.setattr(slowdown, "REFERENCE_S", slowdown.REFERENCE_S / 20)
    assert slowdown.measure() >= 20.0 * 0.5  # at least; this machine may itself be slower than the reference
