"""Fuzz finding on the MQTT inbound boundary, reproduced on the real link over a real socket.

mosquitto refuses a PUBLISH whose topic is not UTF-8, so only the broker itself (compromised, or a rogue one
the device was pointed at) can send one. paho hands such a message on, and reading ``msg.topic`` raises
``UnicodeDecodeError`` inside the link's callback; that escaped paho's loop and ended the link thread, so
the device stopped delivering results. The broker here is a small scripted MQTT 3.1.1 server: it acks what
the device sends, then delivers one message with a non-UTF-8 topic and one good input message.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox

PREFIX = b"edgeguard/v1/fleet/dev-1/"


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    head = conn.recv(1)
    if not head:
        raise ConnectionError("closed")
    length, shift = 0, 0
    while True:
        b = conn.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[0], body


def _publish(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload  # QoS 0: no packet id
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


class ScriptedBroker:
    """Speaks just enough MQTT 3.1.1 for one link: CONNACK, PUBACK, SUBACK, PINGRESP; after the SUBACK for
    the input topic, ``on_subscribed`` returns the packets to deliver."""

    def __init__(self, on_subscribed: Callable[[], list[bytes]]) -> None:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._on_subscribed = on_subscribed
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._srv.accept()
        with conn:
            try:
                while True:
                    kind, body = _read_packet(conn)
                    if kind >> 4 == 1:  # CONNECT
                        conn.sendall(b"\x20\x02\x00\x00")
                    elif kind >> 4 == 3 and (kind >> 1) & 3:  # PUBLISH QoS 1: PUBACK its packet id
                        tlen = int.from_bytes(body[:2], "big")
                        conn.sendall(b"\x40\x02" + body[2 + tlen : 4 + tlen])
                    elif kind >> 4 == 8:  # SUBSCRIBE: grant QoS 1 to each topic filter
                        n, i = 0, 2
                        while i < len(body):
                            i += 2 + int.from_bytes(body[i : i + 2], "big") + 1
                            n += 1
                        conn.sendall(bytes([0x90, 2 + n]) + body[:2] + b"\x01" * n)
                        for packet in self._on_subscribed():
                            conn.sendall(packet)
                    elif kind >> 4 == 12:  # PINGREQ
                        conn.sendall(b"\xd0\x00")
                    elif kind >> 4 == 14:  # DISCONNECT
                        return
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self._srv.close()


def test_topic_that_is_not_utf8_is_dropped_and_the_link_keeps_delivering(tmp_path: Path) -> None:
    good = json.dumps({"inputs": {"x": [1, 2]}}).encode()
    broker = ScriptedBroker(
        lambda: [_publish(PREFIX + b"\x8c\xdd\x96input", b"{}"), _publish(PREFIX + b"input", good)]
    )
    outbox = Outbox(path=tmp_path / "outbox.db", storage_key=bytes(32), device_id="dev-1")
    link = MqttLink(
        config=LinkConfig(port=broker.port, protocol="3.1.1", heartbeat_s=3600.0, startup_wait_s=5.0),
        fleet="fleet",
        device_id="dev-1",
        outbox=outbox,
    )
    received: list[bytes] = []
    arrived = threading.Event()

    def on_input(payload: bytes) -> None:
        received.append(payload)
        arrived.set()

    link.on_inbound("input", on_input)
    try:
        assert link.start() is None
        assert arrived.wait(10.0), f"the good message never arrived; link thread alive: {link.loop_alive}"
        assert received == [good]
        assert link.loop_alive
        assert link.state.inbound_dropped == 1
        assert link.state.connected
    finally:
        link.stop()
        outbox.close()
        broker.close()
