"""The shared body parser: table-driven bad inputs, each refused with a clear one-line reason."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import InputRejected
from edgeguard.sources import BodyLimits, UnsupportedMediaType, parse_body

SPECS = (TensorSpec(name="x", dtype="float32", shape=(1, 4)),)
TWO = (TensorSpec(name="a", dtype="int8", shape=(2,)), TensorSpec(name="b", dtype="float32", shape=(1,)))
LIMITS = BodyLimits(max_body_bytes=4096, max_elements=64)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_json_nested_and_flat_forms() -> None:
    r = parse_body(
        body=b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}, "id": "c1"}',
        content_type="application/json",
        specs=SPECS,
        source="api",
        limits=LIMITS,
    )
    assert r.tensors is not None and r.tensors["x"].dtype == np.float32 and r.tensors["x"].shape == (1, 4)
    assert r.correlation_id == "c1"
    r2 = parse_body(
        body=json.dumps({"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, 4]}}}).encode(),
        content_type="application/json; charset=utf-8",
        specs=SPECS,
        source="api",
        limits=LIMITS,
    )
    assert r2.tensors is not None and r2.tensors["x"].tolist() == [[1, 2, 3, 4]]


def test_npy_and_image_and_sniffing() -> None:
    body = _npy(np.ones((1, 4), np.float32))
    r = parse_body(body=body, content_type="application/x-npy", specs=SPECS, source="api", limits=LIMITS)
    assert r.tensors is not None and r.tensors["x"].sum() == 4
    r = parse_body(body=body, content_type="", specs=SPECS, source="mqtt", limits=LIMITS)
    assert r.tensors is not None
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    assert parse_body(body=png, content_type="", specs=SPECS, source="mqtt", limits=LIMITS).image == png
    b64 = json.dumps({"image_b64": base64.b64encode(png).decode()}).encode()
    assert parse_body(body=b64, content_type="", specs=SPECS, source="mqtt", limits=LIMITS).image == png


BAD = [
    (b"", "application/json", "empty body"),
    (b"x" * 5000, "application/json", "exceeds the limit of 4096"),
    (b"{not json", "application/json", "malformed JSON"),
    (b"[1, 2]", "application/json", "must be an object"),
    (b'{"inputs": {}}', "application/json", "non-empty object"),
    (b'{"inputs": {"y": [1]}}', "application/json", "unknown input 'y'"),
    (b'{"inputs": {"x": [[1, 2], [3]]}}', "application/json", "input 'x'"),
    (b'{"inputs": {"x": ["a", "b"]}}', "application/json", "input 'x'"),
    (b'{"inputs": {"x": {"data": [1, 2], "shape": [3]}}}', "application/json", "input 'x'"),
    (b'{"inputs": {"x": {"data": [1], "dtype": "int8"}}}', "application/json", "the model takes float32"),
    (b'{"inputs": {"x": {"data": [1], "shape": [-1]}}}', "application/json", "non-negative"),
    (b'{"inputs": {"x": 5}}', "application/json", "must be a JSON array"),
    (b'{"inputs": {"x": [1]}, "extra": 1}', "application/json", "unknown key 'extra'"),
    (b'{"inputs": {"x": [1]}, "image_b64": "AA=="}', "application/json", "exactly one"),
    (b'{"image_b64": "!!!"}', "application/json", "not valid base64"),
    (b'{"inputs": {"x": [1]}, "id": 7}', "application/json", "'id' must be"),
    (b'{"inputs": {"x": ' + b"[" * 1500 + b"]" * 1500 + b"}}", "application/json", "JSON"),
    (b'{"inputs": {"x": [' + b"1," * 100 + b"1]}}", "application/json", "more than 64 tensor elements"),
    (b"\x93NUMPY garbage", "application/x-npy", "malformed .npy"),
    (b"hello", "text/plain", "unsupported content type"),
]


@pytest.mark.parametrize(("body", "ctype", "reason"), BAD)
def test_bad_bodies(body: bytes, ctype: str, reason: str) -> None:
    with pytest.raises(InputRejected, match=None) as info:
        parse_body(body=body, content_type=ctype, specs=SPECS, source="api", limits=LIMITS)
    msg = str(info.value)
    assert reason in msg
    assert "\n" not in msg


def test_unsupported_media_type_is_its_own_class() -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_body(body=b"abc", content_type="text/csv", specs=SPECS, source="api", limits=LIMITS)


def test_npy_refuses_pickles_and_non_numeric() -> None:
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputRejected, match="numeric"):
        parse_body(
            body=obj.getvalue(), content_type="application/x-npy", specs=SPECS, source="api", limits=LIMITS
        )
    with pytest.raises(InputRejected, match="numeric"):
        parse_body(
            body=_npy(np.array(["s"])),
            content_type="application/x-npy",
            specs=SPECS,
            source="api",
            limits=LIMITS,
        )


def test_npy_claiming_a_huge_shape_is_refused_before_any_allocation() -> None:
    # A 128-byte header claiming 10**11 float32 elements: np.load alone would try to allocate ~373 GiB.
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }"
    header = header.ljust(117) + "\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 16
    with pytest.raises(InputRejected, match="100000000000 elements exceed the limit"):
        parse_body(body=body, content_type="application/x-npy", specs=SPECS, source="api", limits=LIMITS)
    with pytest.raises(InputRejected, match=r"malformed \.npy body: unknown format version 9\.0"):
        parse_body(body=b"\x93NUMPY\x09\x00" + body[8:], content_type="application/x-npy", specs=SPECS,
                   source="api", limits=LIMITS)


def test_npy_with_several_inputs_needs_a_name() -> None:
    body = _npy(np.ones(2, np.int8))
    with pytest.raises(InputRejected, match=r"name one with \?input\="):
        parse_body(body=body, content_type="application/x-npy", specs=TWO, source="api", limits=LIMITS)
    r = parse_body(
        body=body, content_type="application/x-npy", specs=TWO, source="api", limits=LIMITS, input_name="a"
    )
    assert r.tensors is not None and list(r.tensors) == ["a"]


def test_int_overflow_is_refused_not_wrapped() -> None:
    with pytest.raises(InputRejected, match="input 'a'"):
        parse_body(
            body=b'{"inputs": {"a": [1, 300]}}',
            content_type="application/json",
            specs=TWO,
            source="api",
            limits=LIMITS,
        )


def _npy_header(descr: str, shape: str, data: bytes = b"") -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


@pytest.mark.parametrize(
    ("descr", "shape", "data", "reason"),
    [
        # 64 void items of 1 MiB each: 64 elements pass an element count, np.load would allocate 64 MiB;
        # with the API's default 4 Mi elements it is 4 TiB and a MemoryError (HTTP 500).
        ("|V1048576", "(64,)", b"", "numeric"),
        ("|V8", "(1, 4)", b"\0" * 32, "numeric"),
        ("|O", "(1, 4)", b"", "numeric"),
        ("<U1048576", "(4,)", b"", "numeric"),
        ("|S8", "(1, 4)", b"\0" * 32, "numeric"),
        ("<c8", "(1, 4)", b"\0" * 32, "numeric"),
        ("<M8[s]", "(1, 4)", b"\0" * 32, "numeric"),
        # Numeric, but the claimed bytes are not what the body holds: refused before np.load allocates.
        ("<f8", "(64,)", b"\0" * 8, "claims 512 bytes of data, the body holds 8"),
        ("<f4", "(1, 4)", b"\0" * 17, "claims 16 bytes of data, the body holds 17"),
    ],
)
def test_npy_header_checks_dtype_and_bytes_before_allocating(
    descr: str, shape: str, data: bytes, reason: str
) -> None:
    body = _npy_header(descr, shape, data)
    with pytest.raises(InputRejected, match=reason):
        parse_body(body=body, content_type="application/x-npy", specs=SPECS, source="api", limits=LIMITS)


def test_npy_structured_dtype_is_refused() -> None:
    body = _npy(np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")]))
    with pytest.raises(InputRejected, match="numeric"):
        parse_body(body=body, content_type="application/x-npy", specs=SPECS, source="api", limits=LIMITS)


@pytest.mark.parametrize("number", ["0.5", "7"], ids=["floats", "ints"])
def test_a_big_json_body_lets_other_threads_run_while_it_is_parsed(number: str) -> None:
    """json's C scanner alone holds the GIL for the whole parse: a big body starved the event loop's liveness
    tick and the supervisor killed a healthy worker as hung. Counted, not timed: another thread that only
    yields gets the GIL many times during the parse (with plain json.loads: once or twice)."""
    import threading

    n = 2_000_000
    body = b'{"inputs": {"x": {"shape": [1, %d], "data": [' % n + b",".join([number.encode()] * n) + b"]}}}"
    turns = 0
    parsing = threading.Event()
    done = threading.Event()

    def other() -> None:
        nonlocal turns
        parsing.wait()
        while not done.is_set():
            turns += 1
            time.sleep(0)  # asks for the GIL at once, every time

    t = threading.Thread(target=other)
    t.start()
    try:
        parsing.set()
        before = turns
        with pytest.raises(InputRejected, match="tensor elements"):  # the limit is checked after the parse
            parse_body(body=body, content_type="application/json", source="api",
                       specs=(TensorSpec(name="x", dtype="float32", shape=(1, n)),),
                       limits=BodyLimits(max_body_bytes=len(body), max_elements=1024))
        during = turns - before
    finally:
        done.set()
        t.join()
    assert during >= 10, f"another thread ran only {during} times during the parse"
