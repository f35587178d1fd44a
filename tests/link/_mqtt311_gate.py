"""A real TCP front for mosquitto that speaks like an MQTT 3.1.1-only broker.

mosquitto 2.0.11 has no listener option to refuse MQTT 5, so this gate reads the first packet (CONNECT) of
each connection: protocol level 5 gets the answer a 3.1.1 broker gives (CONNACK return code 1, "unacceptable
protocol version") and the connection is closed; anything else is passed through, byte for byte, to the real
broker behind it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

__all__ = ["Mqtt311OnlyGate"]

_REFUSE_PROTOCOL = b"\x20\x02\x00\x01"  # CONNACK, remaining length 2, flags 0, return code 1


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _read_packet(sock: socket.socket) -> bytes:
    head = _read_exact(sock, 1)
    length, mult, raw = 0, 1, b""
    while True:
        b = _read_exact(sock, 1)
        raw += b
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    return head + raw + _read_exact(sock, length)


class Mqtt311OnlyGate:
    """``silent=True``: close a v5 CONNECT's connection without any CONNACK, as RabbitMQ's MQTT plugin before
    3.13 does (it cannot parse one). ``close_all=True``: close every connection after its CONNECT unanswered
    (a broker that is unwell rather than 3.1.1-only)."""

    def __init__(self, upstream_port: int, *, silent: bool = False, close_all: bool = False) -> None:
        self.upstream_port = upstream_port
        self.silent = silent
        self.close_all = close_all
        self.levels: list[int] = []  # protocol level of every CONNECT seen, in order
        self.refused_v5 = 0
        self.passed: list[int] = []  # protocol level of each CONNECT passed through
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            connect = _read_packet(conn)
            if connect[0] & 0xF0 != 0x10:
                return
            # After the fixed header: protocol name (2-byte length + "MQTT"), then the protocol level.
            i = 1
            while connect[i] & 0x80:
                i += 1
            level = connect[i + 1 + 2 + 4]
            with self._lock:
                self.levels.append(level)
            if self.close_all:
                return
            if level == 5:
                with self._lock:
                    self.refused_v5 += 1
                if not self.silent:
                    conn.sendall(_REFUSE_PROTOCOL)
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.passed.append(level)
                self._conns += [conn, up]
            up.sendall(connect)
            self._pipe(conn, up)
        except (OSError, ConnectionError, IndexError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        finally:
            b.close()

    def drop_connections(self) -> None:
        """Cut every passed-through connection (as a network loss would)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.drop_connections()

    def __enter__(self) -> Mqtt311OnlyGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
