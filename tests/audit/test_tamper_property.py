"""Property: every single-record modification, deletion, insertion, reordering and truncation before the
last checkpoint is detected, and the verifier names the record (thousands of random mutations of a real
log)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeguard.audit import CHECKPOINT_FILE, log_files
from edgeguard.audit._verify import verify_lines
from tests.audit._helpers import write_log

_KEY = Ed25519PrivateKey.generate()
_N = 40


def _fixture(root: Path) -> tuple[list[bytes], dict[str, Any]]:
    write_log(root, _KEY, _N, checkpoint_records=7)
    lines = log_files(root)[0].read_bytes().splitlines()
    return lines, json.loads((root / CHECKPOINT_FILE).read_text())


_CACHE: dict[str, tuple[list[bytes], dict[str, Any]]] = {}


def _log(tmp_path_factory: Any) -> tuple[list[bytes], dict[str, Any]]:
    if "log" not in _CACHE:
        _CACHE["log"] = _fixture(tmp_path_factory.mktemp("audit"))
    return _CACHE["log"]


def _verify(lines: list[bytes], checkpoint: dict[str, Any]) -> Any:
    return verify_lines([(f"line {i + 1}", ln) for i, ln in enumerate(lines)], pub=_KEY.public_key(),
                        external=[checkpoint])


def test_the_unmodified_log_verifies(tmp_path_factory: Any) -> None:
    lines, cp = _log(tmp_path_factory)
    report = _verify(lines, cp)
    assert report.ok and report.covered == len(lines) - 1 == cp["count"]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_single_mutation_is_detected_and_located(tmp_path_factory: Any, data: st.DataObject) -> None:
    lines, cp = _log(tmp_path_factory)
    last = cp["count"]  # records 0 .. last-1 are covered by the newest checkpoint (line `last` is it)
    kind = data.draw(st.sampled_from(["modify", "delete", "insert", "reorder", "truncate"]))
    i = data.draw(st.integers(0, last - 1))
    mutated = list(lines)
    if kind == "modify":
        line = bytearray(mutated[i])
        pos = data.draw(st.integers(0, len(line) - 1))
        new = data.draw(st.integers(0, 255).filter(lambda b: b != line[pos]))
        line[pos] = new
        mutated[i] = bytes(line)
        expect = {i, i + 1}  # the record, or the next one that no longer chains to it
    elif kind == "delete":
        del mutated[i]
        expect = {i}
    elif kind == "insert":
        j = data.draw(st.integers(0, len(lines) - 1))
        mutated.insert(i, lines[j])
        expect = {i, i + 1}  # a copy of record i put before it is indistinguishable from one after it
    elif kind == "reorder":
        j = data.draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i))
        mutated[i], mutated[j] = mutated[j], mutated[i]
        expect = {min(i, j), min(i, j) + 1}
    else:
        mutated = mutated[:i]
        expect = {i}
    report = _verify(mutated, cp)
    assert not report.ok, f"{kind} at {i} not detected"
    assert report.problems[0].seq in expect, (kind, i, str(report.problems[0]))
