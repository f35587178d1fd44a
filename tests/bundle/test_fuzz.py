"""Property tests of the one parser: any bytes give only BundleRejected, within memory limits."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeguard.bundle import BundleLimits, inspect_bundle, open_bundle, verify_bundle
from edgeguard.bundle import _format as fmt
from edgeguard.bundle._open import _MANIFEST_KEYS
from edgeguard.errors import BundleRejected
from tests.bundle.conftest import Parts, Party, body_offset, index_digest, resign, split

# Hypothesis warns that printing the bundle fixture in a failure report would be long; that is fine.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

LIMITS = BundleLimits(max_manifest_bytes=64 * 1024, max_model_bytes=1 << 20, max_golden_bytes=1 << 16)
# Nothing may allocate more than the largest legitimate thing under LIMITS (the model buffer) plus slack.
PEAK_BOUND = LIMITS.max_model_bytes + LIMITS.max_golden_bytes + 2 * LIMITS.max_manifest_bytes + (1 << 20)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextmanager
def bounded_memory() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        assert tracemalloc.get_traced_memory()[1] < PEAK_BOUND
    finally:
        tracemalloc.stop()


def _only_rejected(data: bytes, party: Party) -> None:
    with bounded_memory():
        for call in (
            lambda: open_bundle(
                data, trust=party.trust, device_key=party.device, state_dir=None, limits=LIMITS
            ),
            lambda: verify_bundle(data, trust=party.trust, limits=LIMITS),
            lambda: inspect_bundle(data, limits=LIMITS),
        ):
            try:
                call()
            except BundleRejected as exc:
                assert exc.check in (
                    "signature",
                    "untrusted signer",
                    "malformed",
                    "too large",
                    "integrity",
                    "unsupported",
                    "not a recipient",
                )


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(party: Party, data: bytes) -> None:
    _only_rejected(data, party)


@FUZZ
@given(data=st.binary(min_size=fmt.HEADER_SIZE - 8, max_size=600))
def test_arbitrary_bytes_behind_a_valid_magic(party: Party, data: bytes) -> None:
    _only_rejected(fmt.MAGIC + data, party)


@FUZZ
@given(st.data())
def test_mutated_valid_bundle(party: Party, tiny_bundle: bytes, data: st.DataObject) -> None:
    b = bytearray(tiny_bundle)
    for _ in range(data.draw(st.integers(1, 4))):
        if not b:
            break
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            b[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = data.draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del b[i : i + data.draw(st.integers(1, 64))]
        else:
            del b[i:]
    if bytes(b) != tiny_bundle:
        _only_rejected(bytes(b), party)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(key=st.sampled_from(sorted(_MANIFEST_KEYS)), value=json_values)
def test_signed_manifest_with_arbitrary_field_values(
    party: Party, tiny_bundle: bytes, key: str, value: Any
) -> None:
    """Even a signed manifest (a publisher's mistake) with any JSON in any field only gives BundleRejected."""
    parts = split(tiny_bundle)
    forged = resign(Parts(dict(parts.manifest, **{key: value}), parts.wrapped, parts.chunks), party.publisher)
    _only_rejected(forged, party)


@FUZZ
@given(raw=st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_signed_manifest_of_arbitrary_bytes(party: Party, tiny_bundle: bytes, raw: bytes) -> None:
    body = tiny_bundle[body_offset(tiny_bundle) :]
    header = fmt.HEADER.pack(
        fmt.MAGIC,
        1,
        0,
        len(raw),
        len(body),
        bytes.fromhex(party.publisher.key_id),
        index_digest(tiny_bundle),
    )
    forged = header + raw + party.publisher.private_key.sign(header + raw) + body
    if raw:
        _only_rejected(forged, party)


def test_deeply_nested_signed_manifest(party: Party, tiny_bundle: bytes) -> None:
    raw = b"[" * 60000 + b"]" * 60000
    body = tiny_bundle[body_offset(tiny_bundle) :]
    header = fmt.HEADER.pack(
        fmt.MAGIC,
        1,
        0,
        len(raw),
        len(body),
        bytes.fromhex(party.publisher.key_id),
        index_digest(tiny_bundle),
    )
    forged = header + raw + party.publisher.private_key.sign(header + raw) + body
    _only_rejected(forged, party)
