"""A test-side simulator of the MCU watchdog firmware (firmware_hooks/mcu_watchdog), on a pty master."""

from __future__ import annotations

import os
import select
import struct
import threading
import time

from edgeguard.sources.framing import FrameDecoder, encode_frame
from edgeguard.watchdog._mcu import (
    DISARM_MAGIC,
    MSG_DISARM,
    MSG_DISARM_ACK,
    MSG_HELLO,
    MSG_HELLO_ACK,
    MSG_KICK,
    MSG_KICK_ACK,
    MSG_NAK,
    MSG_STATUS,
    MSG_STATUS_REPLY,
)


class McuSimulator(threading.Thread):
    """Behaves like the firmware: arms on HELLO, accepts increasing kicks, 'resets' the board on timeout."""

    def __init__(self, master_fd: int, *, garbage_before_reply: bytes = b"") -> None:
        super().__init__(daemon=True)
        self.fd = master_fd
        self.decoder = FrameDecoder(max_payload=32)
        self.armed = False
        self.timeout_ms = 0
        self.last_kick = time.monotonic()
        self.last_seq = 0
        self.kicks = 0
        self.board_resets = 0
        self.disarmed = False
        self.silent = False  # stop answering (MCU unplugged)
        self.garbage = garbage_before_reply
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(2)

    def _send(self, payload: bytes) -> None:
        if not self.silent:
            os.write(self.fd, self.garbage + encode_frame(payload))

    def run(self) -> None:
        while not self._halt.is_set():
            if self.armed and (time.monotonic() - self.last_kick) * 1000 > self.timeout_ms:
                self.board_resets += 1
                self.armed = False
            r, _, _ = select.select([self.fd], [], [], 0.02)
            if not r:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                return
            for msg in self.decoder.feed(chunk):
                self.handle(msg)

    def handle(self, msg: bytes) -> None:
        kind = msg[0]
        if kind == MSG_HELLO and len(msg) == 6:
            _, _ver, self.timeout_ms = struct.unpack(">BBI", msg)
            self.armed, self.last_kick, self.last_seq = True, time.monotonic(), 0
            self._send(struct.pack(">BBIHB", MSG_HELLO_ACK, 1, self.timeout_ms, 7, 1))
        elif kind == MSG_KICK and len(msg) == 5:
            (seq,) = struct.unpack(">I", msg[1:])
            if seq <= self.last_seq:
                self._send(bytes([MSG_NAK, 3]))
                return
            self.last_seq, self.last_kick = seq, time.monotonic()
            self.kicks += 1
            self._send(struct.pack(">BI", MSG_KICK_ACK, seq))
        elif kind == MSG_STATUS and len(msg) == 1:
            since = int((time.monotonic() - self.last_kick) * 1000)
            self._send(
                struct.pack(
                    ">BBIIHI",
                    MSG_STATUS_REPLY,
                    int(self.armed),
                    self.timeout_ms,
                    since,
                    self.board_resets,
                    self.last_seq,
                )
            )
        elif kind == MSG_DISARM and msg[1:] == DISARM_MAGIC:
            self.armed, self.disarmed = False, True
            self._send(bytes([MSG_DISARM_ACK]))
        else:
            self._send(bytes([MSG_NAK, 1]))
