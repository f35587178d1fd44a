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
    harness = target(path.parent.name).build(tmp_path)
    try:
        harness.one_input(path.read_bytes())
    finally:
        harness.close()


def _npy(header: bytes) -> bytes:
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(4)


@pytest.mark.parametrize(
    "header",
    [
        # tokenize.TokenError (target body, after 168 executions)
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), } (",
        # IndentationError, a SyntaxError (target body, after ~90,000 executions)
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }\n    1\n  2",
    ],
    ids=["unclosed-bracket", "bad-indentation"],
)
def test_npy_header_numpy_cannot_tokenize_is_refused(header: bytes) -> None:
    """Found by the fuzzer: numpy's header reader tokenizes the header dict, and a header it cannot tokenize
    raised out of parse_body (an HTTP 500 / a failed MQTT input) instead of a one-line refusal."""
    body = _npy(header)
    with pytest.raises(InputRejected, match=r"malformed \.npy body"):
        parse_body(
            body=body, content_type="application/x-npy", specs=[SPEC], source="api", limits=BodyLimits()
        )
    # The same body with a well-formed header is accepted: only the header's syntax was wrong.
    good = _npy(b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }")
    request = parse_body(
        body=good, content_type="application/x-npy", specs=[SPEC], source="api", limits=BodyLimits()
    )
    assert request.tensors is not None
    np.testing.assert_array_equal(request.tensors["q"], np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize("descr", ["<U100000", "|V1048576", "|S65536", "[('a', '<f4', (4096,))]"])
def test_npy_with_a_non_numeric_dtype_is_refused_before_numpy_allocates(descr: str) -> None:
    """Found by the fuzzer (target body, in some short runs): the header check counted elements, not bytes,
    and let any dtype through, so a 100-byte body made ``np.load`` ask for tens of GiB (MemoryError, not a
    refusal). Only numeric dtypes may pass, and then elements bound bytes. Issue 8 item 8 (branch inbound)
    fixes the same in full; this is the part the fuzzer needs."""
    body = _npy(f"{{'descr': {descr if descr.startswith('[') else repr(descr)}, 'fortran_order': False, "
                f"'shape': (60000,), }}".encode())  # fmt: skip
    with pytest.raises(InputRejected, match="numeric array"):
        parse_body(
            body=body, content_type="application/x-npy", specs=[SPEC], source="api", limits=BodyLimits()
        )
