"""External microcontroller watchdog over a serial line (protocol: firmware_hooks/mcu_watchdog/PROTOCOL.md).

The board cannot reset itself when the kernel hangs; an independent microcontroller can. The host says HELLO
(arming the MCU with a timeout), then KICKs with a strictly increasing sequence number; when kicks stop for
the timeout the MCU pulls the board's reset line or power-cycles it. DISARM (with the magic ``STOP``) on a
clean stop. Every message is one frame of :mod:`edgeguard.sources.framing`; replies are parsed here and only
here.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgeguard.errors import WatchdogError
from edgeguard.sources.framing import FrameDecoder, encode_frame

__all__ = [
    "McuWatchdog",
    "McuStatus",
    "SerialPort",
    "PROTOCOL_VERSION",
    "MSG_HELLO",
    "MSG_KICK",
    "MSG_STATUS",
    "MSG_DISARM",
    "MSG_HELLO_ACK",
    "MSG_KICK_ACK",
    "MSG_STATUS_REPLY",
    "MSG_DISARM_ACK",
    "MSG_NAK",
    "DISARM_MAGIC",
]

PROTOCOL_VERSION = 1
MSG_HELLO = 0x01  # host -> MCU: version u8, timeout_ms u32
MSG_KICK = 0x02  # host -> MCU: seq u32
MSG_STATUS = 0x03  # host -> MCU: (empty)
MSG_DISARM = 0x04  # host -> MCU: b"STOP"
MSG_HELLO_ACK = 0x81  # MCU -> host: version u8, timeout_ms u32, boot_count u16, last_reset_cause u8
MSG_KICK_ACK = 0x82  # MCU -> host: seq u32
MSG_STATUS_REPLY = 0x83  # MCU -> host: armed u8, timeout_ms u32, since_kick_ms u32, resets u16, last_seq u32
MSG_DISARM_ACK = 0x84  # MCU -> host: (empty)
MSG_NAK = 0xEE  # MCU -> host: code u8 (1 unknown type, 2 bad length, 3 stale sequence, 4 bad version)
DISARM_MAGIC = b"STOP"
MAX_PAYLOAD = 32


class SerialPort(Protocol):
    """The slice of ``serial.Serial`` this module uses (lets tests pass a pty-backed port)."""

    def write(self, data: bytes, /) -> int | None: ...
    def read(self, size: int = 1, /) -> bytes: ...
    def close(self) -> None: ...

    @property
    def in_waiting(self) -> int: ...


@dataclass(frozen=True)
class McuStatus:
    armed: bool
    timeout_ms: int
    since_kick_ms: int
    resets: int
    last_seq: int


def _open_serial(port: str, baudrate: int) -> SerialPort:
    import serial  # noqa: PLC0415 - lazily: only boards with an external watchdog need pyserial

    try:
        sp: Any = serial.Serial(port, baudrate=baudrate, timeout=0.05, write_timeout=1.0)
    except (serial.SerialException, OSError) as exc:
        raise WatchdogError(f"cannot open MCU watchdog port {port}: {exc}") from None
    return sp  # type: ignore[no-any-return]


class McuWatchdog:
    kind = "mcu"

    def __init__(
        self,
        *,
        port: str,
        timeout_s: float,
        baudrate: int = 115200,
        reply_timeout_s: float = 0.5,
        opener: Callable[[str, int], SerialPort] = _open_serial,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1.0 <= timeout_s <= 3600.0:
            raise ValueError("MCU watchdog timeout must be 1..3600 s")
        self.port_name = port
        self.timeout_s = timeout_s
        self._baud = baudrate
        self._reply_timeout = reply_timeout_s
        self._opener = opener
        self._clock = clock
        self._port: SerialPort | None = None
        self._decoder = FrameDecoder(max_payload=MAX_PAYLOAD)
        self._seq = 0
        self.kicks = 0
        self.missed_acks = 0
        self.boot_count: int | None = None
        self.last_reset_cause: int | None = None

    @property
    def kick_interval_s(self) -> float:
        return max(0.2, self.timeout_s / 4)

    def open(self) -> None:
        self._port = self._opener(self.port_name, self._baud)
        reply = self._request(
            struct.pack(">BBI", MSG_HELLO, PROTOCOL_VERSION, int(self.timeout_s * 1000)),
            MSG_HELLO_ACK,
            attempts=3,
        )
        if reply is None or len(reply) != 9:
            self.close(clean=False)
            raise WatchdogError(f"MCU watchdog on {self.port_name} did not answer HELLO")
        _, version, _timeout_ms, boots, cause = struct.unpack(">BBIHB", reply)
        if version != PROTOCOL_VERSION:
            self.close(clean=False)
            raise WatchdogError(f"MCU watchdog speaks protocol {version}, expected {PROTOCOL_VERSION}")
        self.boot_count, self.last_reset_cause = boots, cause

    def kick(self) -> bool:
        """One KICK; True when the MCU acknowledged this exact sequence number."""
        if self._port is None:
            return False
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        reply = self._request(struct.pack(">BI", MSG_KICK, self._seq), MSG_KICK_ACK, attempts=1)
        if reply is None or len(reply) != 5 or struct.unpack(">I", reply[1:])[0] != self._seq:
            self.missed_acks += 1
            return False
        self.kicks += 1
        return True

    def status(self) -> McuStatus | None:
        reply = self._request(bytes([MSG_STATUS]), MSG_STATUS_REPLY, attempts=2)
        if reply is None or len(reply) != 16:
            return None
        _, armed, timeout_ms, since, resets, last_seq = struct.unpack(">BBIIHI", reply)
        return McuStatus(bool(armed), timeout_ms, since, resets, last_seq)

    def close(self, *, clean: bool = True) -> None:
        if self._port is None:
            return
        try:
            if clean:
                self._request(bytes([MSG_DISARM]) + DISARM_MAGIC, MSG_DISARM_ACK, attempts=2)
        finally:
            port, self._port = self._port, None
            port.close()

    def _request(self, message: bytes, expect: int, *, attempts: int) -> bytes | None:
        assert self._port is not None
        for _ in range(attempts):
            try:
                self._port.write(encode_frame(message))
                deadline = self._clock() + self._reply_timeout
                while self._clock() < deadline:
                    chunk = self._port.read(max(1, self._port.in_waiting))
                    for payload in self._decoder.feed(chunk):
                        if payload and payload[0] == expect:
                            return payload
                        # Stale replies (a late KICK_ACK) and NAKs are skipped; the caller counts the miss.
            except OSError as exc:
                raise WatchdogError(f"MCU watchdog port {self.port_name}: {exc}") from None
            except Exception as exc:  # pyserial raises SerialException (an OSError subclass on most versions)
                raise WatchdogError(f"MCU watchdog port {self.port_name}: {exc}") from None
        return None
