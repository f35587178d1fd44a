"""The shared body parser: table-driven bad inputs, each refused with a clear one-line reason."""

from __future__ import annotations

import base64
import io
import json

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
