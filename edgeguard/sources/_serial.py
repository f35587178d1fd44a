"""Serial sensor frames (pyserial): the only parser of bytes from a sensor's serial line.

Framing is :mod:`edgeguard.sources.framing` (COBS + CRC-16; resynchronises after garbage or a cut frame). One
frame's payload is::

    seq u32 big-endian || the input tensor's raw bytes (declared dtype, little-endian, C order)

The target input must have a fixed shape, so the payload length is exact and anything else is refused. When
the port disappears (USB adapter unplugged, device node removed) the reader closes it and reopens it with
backoff until it comes back; nothing else stops.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import EdgeGuardError, InputRejected

from ._request import InferenceRequest, InferenceSink
from .framing import FrameDecoder

__all__ = ["SerialConfig", "SerialSource", "parse_sensor_frame"]

_log = logging.getLogger("edgeguard.sources.serial")


@dataclass(frozen=True, kw_only=True)
class SerialConfig:
    port: str
    baudrate: int = 115200
    input: str | None = None  # model input fed by the frames (default: the only one)
    max_payload: int = 65536
    reopen_min_s: float = 0.2
    reopen_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.port:
            raise ValueError("serial port must be given")
        if not 50 <= self.baudrate <= 4_000_000:
            raise ValueError("baudrate must be 50..4000000")
        if not 8 <= self.max_payload <= 1 << 20:
            raise ValueError("max_payload must be 8 B .. 1 MiB")
        if not 0 < self.reopen_min_s <= self.reopen_max_s <= 600:
            raise ValueError("need 0 < reopen_min_s <= reopen_max_s <= 600")


def parse_sensor_frame(payload: bytes, spec: TensorSpec) -> tuple[int, InferenceRequest]:
    """A verified frame payload -> (sequence, request); InputRejected when the length is not exact."""
    if any(d is None for d in spec.shape):
        raise InputRejected(f"input {spec.name!r} has a dynamic shape; serial frames need a fixed one")
    shape = tuple(int(d) for d in spec.shape if d is not None)
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    expected = 4 + math.prod(shape) * dtype.itemsize
    if len(payload) != expected:
        raise InputRejected(f"sensor frame of {len(payload)} bytes, expected {expected} for {spec.name!r}")
    seq = int.from_bytes(payload[:4], "big")
    array = np.frombuffer(payload, dtype=dtype, offset=4).reshape(shape).astype(spec.dtype)
    return seq, InferenceRequest(source="serial", tensors={spec.name: array}, correlation_id=f"serial-{seq}")


def _open_serial(port: str, baudrate: int) -> Any:
    import serial  # noqa: PLC0415 - lazily: pyserial is only needed on devices with a serial source

    return serial.Serial(port, baudrate=baudrate, timeout=0.1)


class SerialSource:
    name = "serial"

    def __init__(
        self,
        *,
        config: SerialConfig,
        sink: InferenceSink,
        specs: Callable[[], Sequence[TensorSpec]],
        opener: Callable[[str, int], Any] = _open_serial,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._sink = sink
        self._specs = specs
        self._opener = opener
        self._sleep = sleep
        self.decoder = FrameDecoder(max_payload=config.max_payload)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.counts = {"ok": 0, "rejected": 0, "failed": 0, "opens": 0, "disconnects": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="eg-serial", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _spec(self) -> TensorSpec:
        specs = list(self._specs())
        if self.config.input is None:
            if len(specs) != 1:
                raise InputRejected("the model has several inputs; set sources.serial.input")
            return specs[0]
        for s in specs:
            if s.name == self.config.input:
                return s
        raise InputRejected(f"sources.serial.input {self.config.input!r} is not an input of the model")

    def _run(self) -> None:
        backoff = self.config.reopen_min_s
        while not self._halt.is_set():
            try:
                port = self._opener(self.config.port, self.config.baudrate)
            except Exception as exc:  # pyserial raises SerialException/OSError/ValueError for a missing port
                _log.debug("serial %s not available: %s", self.config.port, exc)
                self._halt.wait(backoff)
                backoff = min(backoff * 2, self.config.reopen_max_s)
                continue
            self.counts["opens"] += 1
            self.connected = True
            backoff = self.config.reopen_min_s
            # A reopened line starts mid-stream: drop any partial frame the decoder held.
            self.decoder.feed(b"\0")
            try:
                self._read_loop(port)
            finally:
                self.connected = False
                try:
                    port.close()
                except Exception:
                    _log.debug("closing serial port failed", exc_info=True)

    def _read_loop(self, port: Any) -> None:
        while not self._halt.is_set():
            try:
                chunk = port.read(max(1, min(4096, getattr(port, "in_waiting", 0) or 1)))
            except Exception as exc:  # the port vanished (EIO, ENXIO, SerialException)
                self.counts["disconnects"] += 1
                _log.warning("serial %s lost: %s; reconnecting", self.config.port, exc)
                return
            for payload in self.decoder.feed(chunk):
                self._handle(payload)

    def _handle(self, payload: bytes) -> None:
        try:
            _, request = parse_sensor_frame(payload, self._spec())
            self._sink(request)
            self.counts["ok"] += 1
        except InputRejected as exc:
            self.counts["rejected"] += 1
            _log.warning("serial frame rejected: %s", exc)
        except EdgeGuardError as exc:
            self.counts["failed"] += 1
            _log.warning("serial frame failed: %s", exc)
        except Exception:  # a bug or MemoryError must not end the reading thread (later frames unread)
            self.counts["failed"] += 1
            _log.exception("serial frame failed")

    def snapshot(self) -> dict[str, Any]:
        s = self.decoder.stats
        return {
            **self.counts,
            "connected": self.connected,
            "frames": s.frames,
            "bad_crc": s.bad_crc,
            "bad_encoding": s.bad_encoding,
            "oversize": s.oversize,
        }
