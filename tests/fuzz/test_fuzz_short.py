"""The short fuzz run of the test command: every harness in tools/fuzzing/harnesses.py, each in a child
process for ``EDGEGUARD_FUZZ_SECONDS`` (default 10) seconds, fails on any crash, hang or over-limit
allocation. The long run is ``tools/fuzz.py --minutes N``; the selftests prove the runner reports each kind
of finding, so a green short run means something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris has wheels for x86_64 Linux only (see pyproject's dev extra)")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from fuzzing.harnesses import TARGETS  # noqa: E402

SECONDS = float(os.environ.get("EDGEGUARD_FUZZ_SECONDS", "10"))


def _fuzz(out: Path, *args: str) -> tuple[int, list[dict[str, object]]]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--out", str(out), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("name", [t.name for t in TARGETS])
def test_short_run_finds_nothing(name: str, tmp_path: Path) -> None:
    rc, [result] = _fuzz(tmp_path, "--target", name, "--seconds", str(SECONDS))
    assert result["finding"] is None, (
        f"{name}: {result['finding']}: {result['detail']} (input: {result['input']})"
    )
    assert rc == 0
    assert isinstance(result["executions"], int) and result["executions"] > 100, result
    assert isinstance(result["features"], int) and result["features"] > 0, result


@pytest.mark.parametrize(
    ("kind", "finding", "detail"),
    [
        ("crash", "crash", "KeyError: 'selftest'"),
        ("hang", "hang", "timeout"),
        ("alloc", "over-limit allocation", "MemoryError"),
    ],
)
def test_runner_reports_each_kind_of_finding(kind: str, finding: str, detail: str, tmp_path: Path) -> None:
    rc, [result] = _fuzz(tmp_path, "--target", f"selftest-{kind}", "--seconds", "30", "--timeout", "1")
    assert rc == 1
    assert result["finding"] == finding
    assert detail in str(result["detail"])
    saved = Path(str(result["input"]))
    assert saved.parent == tmp_path / "crashes" / f"selftest-{kind}"
    assert saved.read_bytes() == kind.encode()
