"""Inputs the fuzzer found, kept: each one named, and every saved crash input replayed through its harness.

A new finding goes into ``tests/fuzz/regressions/<target>/<what-it-is>`` (the file ``tools/fuzz.py`` saved)
and, when the bug deserves a name, a test below that shows it on the parser's public entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgeguard.bundle import TensorSpec
from edgeguard.errors import InputRejected
from edgeguard.sources import BodyLimits, parse_body

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from fuzzing.harnesses import target  # noqa: E402

REGRESSIONS = Path(__file__).with_name("regressions")
SAVED = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())
SPEC = TensorSpec(name="q", dtype="uint8", shape=(2, 2))


@pytest.mark.parametrize("path", SAVED, ids=[f"{p.parent.name}/{p.name}" for p in SAVED])
def test_saved_finding_is_handled_as_documented(path: Path, tmp_path: Path) -> None:
    target(path.parent.name).build(tmp_path).one_input(path.read_bytes())


def test_npy_header_with_an_unclosed_bracket_is_refused() -> None:
    """Found by the fuzzer (target body, 168 executions): numpy's header reader tokenizes the header dict,
    and an unbalanced bracket raised ``tokenize.TokenError`` out of parse_body instead of a refusal."""
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), } ("
    header += b" " * (63 - len(header) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(4)
    with pytest.raises(InputRejected, match=r"malformed \.npy body"):
        parse_body(
            body=body, content_type="application/x-npy", specs=[SPEC], source="api", limits=BodyLimits()
        )
    # The same body with a well-formed header is accepted: only the bracket is wrong.
    good = (
        b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.replace(b"} (", b"}  ") + bytes(4)
    )
    request = parse_body(
        body=good, content_type="application/x-npy", specs=[SPEC], source="api", limits=BodyLimits()
    )
    assert request.tensors is not None
    np.testing.assert_array_equal(request.tensors["q"], np.zeros((2, 2), np.uint8))
