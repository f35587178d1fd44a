"""Framing: shared vectors (the firmware uses the same file), round trips, resync after garbage and cuts."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edgeguard.sources.framing import FrameDecoder, cobs_decode, cobs_encode, crc16_ccitt, encode_frame

VECTORS = json.loads(
    (Path(__file__).parents[2] / "firmware_hooks/mcu_watchdog/test_vectors.json").read_text()
)


def test_crc_vectors() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1  # the catalogue check value of CRC-16/CCITT-FALSE
    for v in VECTORS["crc16_ccitt_false"]:
        assert crc16_ccitt(bytes.fromhex(v["data_hex"])) == int(v["crc"], 16)


def test_cobs_vectors() -> None:
    for v in VECTORS["cobs"]:
        raw, enc = bytes.fromhex(v["raw_hex"]), bytes.fromhex(v["encoded_hex"])
        assert cobs_encode(raw) == enc
        assert cobs_decode(enc) == raw
        assert 0 not in enc


def test_frame_vectors() -> None:
    for v in VECTORS["frames"]:
        payload, frame = bytes.fromhex(v["payload_hex"]), bytes.fromhex(v["frame_hex"])
        assert encode_frame(payload) == frame, v["name"]
        assert FrameDecoder(max_payload=64).feed(frame) == [payload]


@given(st.binary(max_size=700))
def test_round_trip(payload: bytes) -> None:
    assert cobs_decode(cobs_encode(payload)) == payload
    d = FrameDecoder(max_payload=1024)
    frame = encode_frame(payload)
    out = [p for i in range(0, len(frame), 7) for p in d.feed(frame[i : i + 7])]  # arbitrary chunking
    assert out == [payload]


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=10_000))
def test_any_single_byte_flip_is_refused(payload: bytes, where: int) -> None:
    frame = bytearray(encode_frame(payload))
    i = 1 + where % (len(frame) - 2)  # inside the body
    frame[i] ^= 0x5A
    d = FrameDecoder(max_payload=1024)
    out = d.feed(bytes(frame) + encode_frame(b"next"))
    assert payload not in out or payload == b"next"
    assert out[-1] == b"next"  # the following frame always survives


def test_resync_after_garbage_and_cut_frame() -> None:
    d = FrameDecoder(max_payload=64)
    good1, good2 = encode_frame(b"\x01\x02\x00\x03"), encode_frame(b"hello")
    cut = encode_frame(b"this frame is cut short")[:-9]
    stream = b"\xff\xfe garbage \x13" + good1 + cut + good2 + b"\x00\x00"
    assert d.feed(stream) == [b"\x01\x02\x00\x03", b"hello"]
    assert d.stats.frames == 2
    assert d.stats.bad_crc + d.stats.bad_encoding == 2  # the garbage run and the cut frame


def test_oversize_is_dropped_up_to_the_next_delimiter() -> None:
    d = FrameDecoder(max_payload=16)
    assert d.feed(encode_frame(bytes(range(1, 200))) + encode_frame(b"ok")) == [b"ok"]
    assert d.stats.oversize == 1
    assert len(d._buf) == 0
