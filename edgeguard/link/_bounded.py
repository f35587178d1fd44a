"""A paho client that never buffers an inbound packet larger than the link accepts.

paho reads a packet's fixed header (type, remaining length), then reads the whole remaining length into one
growing buffer before anything can look at it: a 200 MiB PUBLISH on an input topic costs the device its
size several times over (the buffer, the message's payload, our copy) before the router's size check runs.

Two layers keep an oversize message off the device:

1. MQTT 5: CONNECT carries the Maximum Packet Size property (MQTT 5.0, 3.1.2.11.4). The broker must not send
   a larger packet; mosquitto drops the PUBLISH for this client and keeps the connection (its test
   ``12-prop-maximum-packet-size-publish*``), so the device never sees it.
2. MQTT 3.1.1 has no such property (the broker's own ``max_packet_size`` / ``message_size_limit`` is the
   operator's control, see docs/link.md), and a broker may ignore the property: this client then reads an
   oversize PUBLISH's body in small chunks and throws the bytes away, keeping only its topic and packet id
   (at most 64 KiB), acknowledges it (QoS 1) so the broker does not send it again on the next session, and
   reports it. Any other oversize packet (only a broken broker sends one) drops the connection.

paho offers no public hook between reading the remaining length and reading the body, so this overrides
``_sock_recv`` and reads ``_in_packet``, paho's private reader state (paho 2.0 .. 2.2, exercised against a
real mosquitto by tests/link and tests/security). A paho whose reader looks different is refused when the
client is made (LinkError naming the version), never silently left unbounded.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.client import time_func

from edgeguard.errors import LinkError

__all__ = ["BoundedClient", "PACKET_OVERHEAD"]

# Room for everything in a PUBLISH besides the payload: fixed header (5), topic (2 + our topics, < 400),
# packet id (2), MQTT 5 properties. A publisher that adds more properties than this to a payload at the limit
# has its message dropped like an oversize one.
PACKET_OVERHEAD = 8192

_PUBLISH = 0x30
_CHUNK = 64 * 1024
_CHUNKS_PER_CALL = 64  # then let the loop write (PUBACKs, PINGREQ) before reading on
_HEAD_MAX = 2 + 65535 + 2  # topic length, topic, packet id: all we keep of a discarded PUBLISH
_READER_KEYS = frozenset(
    ("command", "have_remaining", "remaining_count", "remaining_mult", "remaining_length", "packet",
     "to_process", "pos")
)

OversizeHandler = Callable[[str, int], None]  # (topic, packet size in bytes); runs in the link thread


class BoundedClient(mqtt.Client):
    """``mqtt.Client`` whose reader refuses packets with a remaining length over ``max_packet`` bytes."""

    def __init__(self, *args: Any, max_packet: int, on_oversize: OversizeHandler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reader = getattr(self, "_in_packet", None)
        if not (
            isinstance(reader, dict)
            and set(reader) >= _READER_KEYS
            and callable(getattr(mqtt.Client, "_sock_recv", None))
            and callable(getattr(mqtt.Client, "_send_puback", None))
            and hasattr(self, "_msgtime_mutex")
        ):
            raise LinkError(
                f"link: paho-mqtt {paho.mqtt.__version__} reads packets differently from 2.0 .. 2.2; the "
                "inbound size guard (edgeguard/link/_bounded.py) needs updating for it"
            )
        self.max_packet = max_packet
        self.on_oversize = on_oversize
        self.discarded = 0
        self._skip_left = 0
        self._skip_size = 0
        self._skip_command = 0
        self._skip_sock: Any = None  # the connection the discard belongs to
        self._skip_head = bytearray()

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._skip_left and self._skip_sock is not self._sock:
            # The connection broke mid-discard (reset, timeout) and paho has connected anew: its reader
            # starts over, and so does ours, or the new connection's CONNACK would be thrown away.
            self._skip_left = 0
            self._skip_head = bytearray()
        pkt = self._in_packet
        if (
            not self._skip_left
            and pkt["have_remaining"]
            and pkt["to_process"] == pkt["remaining_length"]  # paho's first read of this packet's body
            and pkt["remaining_length"] > self.max_packet
        ):
            if pkt["command"] & 0xF0 != _PUBLISH:
                raise ConnectionAbortedError(
                    f"broker sent a packet of {pkt['remaining_length']} bytes (limit {self.max_packet})"
                )
            self._skip_left = self._skip_size = pkt["remaining_length"]
            self._skip_command = pkt["command"]
            self._skip_sock = self._sock
            self._skip_head = bytearray()
        if not self._skip_left:
            return bytes(super()._sock_recv(bufsize))
        return self._discard()

    def _discard(self) -> bytes:
        """Read and drop the oversize body; paho's reader state stays at "body not started" meanwhile."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("socket closed")
        for _ in range(_CHUNKS_PER_CALL):
            try:
                chunk = sock.recv(min(_CHUNK, self._skip_left))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise BlockingIOError from None
            if not chunk:
                self._skip_left = 0
                return b""  # the connection closed mid-packet: paho reports the loss
            # Bytes arriving count as a live connection for paho's keepalive, as when paho reads them itself:
            # on a slow line, a PINGRESP queued behind this body must not make paho drop the connection.
            with self._msgtime_mutex:
                self._last_bytes_received = time_func()
            if len(self._skip_head) < _HEAD_MAX:
                self._skip_head += chunk[: _HEAD_MAX - len(self._skip_head)]
            self._skip_left -= len(chunk)
            if not self._skip_left:
                self._finish_discard()
                break
        # Nothing for paho to read now: it returns to the loop, which selects again for the rest.
        raise BlockingIOError

    def _finish_discard(self) -> None:
        head = bytes(self._skip_head)
        self._skip_head = bytearray()
        # The packet is gone: reset paho's reader to "expecting a new packet", as paho does after each one.
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        self.discarded += 1
        topic_len = int.from_bytes(head[:2], "big")
        topic = head[2 : 2 + topic_len].decode("utf-8", "replace")
        qos = (self._skip_command >> 1) & 0x03
        if qos == 1 and len(head) >= 4 + topic_len:
            # Acknowledged as received-and-refused: without it the broker sends it again on every reconnect.
            # (QoS 2 cannot arrive: the link subscribes at QoS 1, and the broker delivers at most that.)
            self._send_puback(int.from_bytes(head[2 + topic_len : 4 + topic_len], "big"))
        self.on_oversize(topic, self._skip_size)
