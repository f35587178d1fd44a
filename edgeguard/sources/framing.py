"""Serial framing shared by the sensor source and the external watchdog: COBS + CRC-16/CCITT-FALSE.

On the wire one frame is::

    0x00  COBS( payload || crc16_be(payload) )  0x00

COBS (Cheshire & Baker, 1999) removes every 0x00 from the body, so 0x00 only ever delimits frames. A receiver
that starts mid-frame, meets garbage or a frame cut short by a reset resynchronises at the next 0x00: the
leading delimiter makes the first whole frame after a cut decode cleanly instead of being glued to the cut
tail. The CRC (poly 0x1021, init 0xFFFF, no reflection, no final xor; check value 0x29B1 for b"123456789")
catches line noise; it is cheap on an 8-bit microcontroller, which is why it was chosen over CRC-32.

The byte-exact format and shared test vectors are in ``firmware_hooks/mcu_watchdog/PROTOCOL.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["crc16_ccitt", "cobs_encode", "cobs_decode", "encode_frame", "FrameDecoder", "FrameStats"]

DELIMITER = 0x00


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (bitwise: frames are small and firmware computes it the same way)."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the output holds no 0x00 and is at most len/254 + 1 bytes longer."""
    out = bytearray()
    block = bytearray()
    after_full_block = False  # a 0xFF block implies no zero, so data ending right after one needs no tail
    for byte in data:
        after_full_block = False
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
                after_full_block = True
    if not after_full_block:
        out.append(len(block) + 1)
        out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises ValueError on a body that no encoder could have produced."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("zero byte inside a COBS block")
        end = i + code
        if end > n:
            raise ValueError("COBS block runs past the end of the frame")
        block = data[i + 1 : end]
        if 0 in block:
            raise ValueError("zero byte inside a COBS block")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """One complete frame for ``payload``, delimiters included."""
    crc = crc16_ccitt(payload)
    return bytes([DELIMITER]) + cobs_encode(payload + crc.to_bytes(2, "big")) + bytes([DELIMITER])


@dataclass
class FrameStats:
    """Counters of what the decoder had to throw away; reported in the heartbeat."""

    frames: int = 0
    bad_crc: int = 0
    bad_encoding: int = 0
    oversize: int = 0
    bytes_dropped: int = 0


@dataclass
class FrameDecoder:
    """Incremental decoder: feed any chunks of bytes, get whole verified payloads back.

    This is the only place where serial bytes become payloads. A body longer than ``max_payload`` (after
    encoding overhead) is dropped up to the next delimiter and counted, never buffered without bound.
    """

    max_payload: int
    stats: FrameStats = field(default_factory=FrameStats)
    _buf: bytearray = field(default_factory=bytearray)
    _skipping: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_payload <= 1 << 20:
            raise ValueError("max_payload must be within 1..1 MiB")

    @property
    def _max_body(self) -> int:
        raw = self.max_payload + 2  # + CRC
        return raw + raw // 254 + 1

    def feed(self, chunk: bytes) -> list[bytes]:
        payloads: list[bytes] = []
        for byte in chunk:
            if byte != DELIMITER:
                if self._skipping:
                    self.stats.bytes_dropped += 1
                elif len(self._buf) >= self._max_body:
                    self.stats.oversize += 1
                    self.stats.bytes_dropped += len(self._buf) + 1
                    self._buf.clear()
                    self._skipping = True
                else:
                    self._buf.append(byte)
                continue
            self._skipping = False
            if not self._buf:
                continue  # back-to-back delimiters are the idle/resync pattern, not a frame
            body = bytes(self._buf)
            self._buf.clear()
            payload = self._verify(body)
            if payload is not None:
                payloads.append(payload)
        return payloads

    def _verify(self, body: bytes) -> bytes | None:
        try:
            raw = cobs_decode(body)
        except ValueError:
            self.stats.bad_encoding += 1
            self.stats.bytes_dropped += len(body)
            return None
        if len(raw) < 2 or crc16_ccitt(raw[:-2]) != int.from_bytes(raw[-2:], "big"):
            self.stats.bad_crc += 1
            self.stats.bytes_dropped += len(body)
            return None
        self.stats.frames += 1
        return raw[:-2]
