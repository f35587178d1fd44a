"""A fake MQTT 3.1.1 broker on a real socket, for what mosquitto cannot be made to do on cue: send one
oversize PUBLISH slowly (a slow line), or reset the connection in the middle of it."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

__all__ = ["SlowBroker"]


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class SlowBroker:
    """Just enough of an MQTT 3.1.1 broker on a real socket to send one oversize PUBLISH slowly: CONNACK, then
    the PUBLISH trickled over ``seconds``, then a PINGRESP for each PINGREQ it got meanwhile (a real broker's
    answers queue behind the body it is sending). Records the client's packets (type nibble, body)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.packets: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None  # the connection left open at the end

    def _read_packets(self, conn: socket.socket) -> None:
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                piece = conn.recv(n - len(data))
                if not piece:
                    raise ConnectionError("closed")
                data += piece
            return data

        # recv on the socket itself (no makefile, which would keep the descriptor open past close()).
        with contextlib.suppress(OSError):
            while True:
                head = read(1)[0]
                length, mult = 0, 1
                while True:
                    byte = read(1)[0]
                    length += (byte & 127) * mult
                    mult *= 128
                    if not byte & 128:
                        break
                body = read(length)
                with self.lock:
                    self.packets.append((head >> 4, body))

    def kinds(self) -> list[int]:
        with self.lock:
            return [k for k, _ in self.packets]

    def accept(self) -> socket.socket:
        """The next connection, answered with CONNACK (accepted) once its CONNECT arrived."""
        conn, _ = self.server.accept()
        connects = self.kinds().count(1)
        threading.Thread(target=self._read_packets, args=(conn,), daemon=True).start()
        assert _wait(lambda: self.kinds().count(1) > connects)  # CONNECT
        conn.sendall(b"\x20\x02\x00\x00")
        return conn

    def serve(self, topic: bytes, payload_len: int, seconds: float, *, reset_at: float = 1.0) -> None:
        """``reset_at`` < 1: the connection is reset (RST) after that share of the body, then the next
        connection is accepted."""
        conn = self.accept()
        body = len(topic).to_bytes(2, "big") + topic + (7).to_bytes(2, "big")  # QoS 1, packet id 7
        n, length = bytearray(), len(body) + payload_len
        while True:
            n.append((length & 127) | (128 if length > 127 else 0))
            length >>= 7
            if not length:
                break
        conn.sendall(b"\x32" + bytes(n) + body)
        steps = int(seconds / 0.25)
        chunk = payload_len // steps
        for i in range(steps):
            if i >= steps * reset_at:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RD)  # wakes our reader thread's recv, sends nothing
                conn.close()  # with linger 0: a reset, not an orderly close
                self.conn = self.accept()
                return
            conn.sendall(b"\0" * (chunk if i < steps - 1 else payload_len - i * chunk))
            time.sleep(0.25)  # the slow line under test
        conn.sendall(b"\xd0\x00" * self.kinds().count(12))  # the PINGRESPs that queued behind the body
        self.conn = conn
