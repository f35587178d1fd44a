"""`edgeguard bench`: tables that fit 100 columns with each ratio marked, --strict, no LiteRT INFO lines."""

from __future__ import annotations

import pytest

from edgeguard.cli import main
from edgeguard.engine import _bench


def _run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["bench", "--quick", "--only", "blazeface", *argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_tables_fit_100_columns_marked_and_no_native_info(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capfd)
    assert code == 0  # without --strict a missed target is reported, not an error
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "Throughput" in out and "Cold start" in out
    rows = [line for line in lines if line.startswith("│ blazeface")]
    assert len(rows) == 2 and all(("✓" in r) != ("✗" in r) for r in rows), rows
    # LiteRT's C++ runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate" on fd 2 per interpreter.
    assert "INFO:" not in out + err, err


def test_strict_exits_1_when_a_ratio_misses(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_bench.TARGETS, "blazeface", 1e9)  # a target no run can meet
    code, out, _ = _run(capfd, "--strict")
    assert code == 1 and "below target: blazeface" in out
    code, out, _ = _run(capfd)
    assert code == 0 and "--strict makes this exit 1" in out


def test_strict_exits_0_when_every_ratio_meets(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_bench.TARGETS, "blazeface", 0.0)
    monkeypatch.setattr(_bench, "COLD_TARGET", 1e9)
    code, out, _ = _run(capfd, "--strict", "--json")
    assert code == 0 and '"missed": []' in out
