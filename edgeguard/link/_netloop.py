"""paho's network loop run by the link thread itself, its wake-up socket pair, and client construction.

The link thread calls ``network_pass`` where paho's ``loop_start()`` thread would call ``Client.loop``: the
same select / loop_read / loop_write / loop_misc, plus a socket pair through which other threads wake it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.errors import LinkError
from edgeguard.link._bounded import PACKET_OVERHEAD, BoundedClient, OversizeHandler
from edgeguard.link._config import LinkConfig

__all__ = ["Waker", "SubWait", "network_pass", "new_client", "tls_context"]


class _ServerNameContext(ssl.SSLContext):
    """A client context that sends ``server_name`` as SNI and checks the certificate against it, whatever
    host paho connects to: paho passes its connect host as ``server_hostname`` and has no option for
    another name, and this is the one call through which every TLS socket it makes is created."""

    server_name: str

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(cfg: LinkConfig) -> ssl.SSLContext:
    """CERT_REQUIRED and host name checking (PROTOCOL_TLS_CLIENT's defaults) against ``ca_file``."""
    ctx: ssl.SSLContext
    if cfg.tls_server_name is not None:
        named = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        named.server_name = cfg.tls_server_name
        ctx = named
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cfg.ca_file))
    if cfg.client_cert is not None:
        ctx.load_cert_chain(str(cfg.client_cert), None if cfg.client_key is None else str(cfg.client_key))
    return ctx


class Waker:
    """A non-blocking socket pair: any thread may ``poke()``; the link thread selects on ``sock``."""

    def __init__(self) -> None:
        self.sock, self._w = socket.socketpair()
        self.sock.setblocking(False)
        self._w.setblocking(False)

    def poke(self) -> None:
        with contextlib.suppress(OSError):  # full (already poked) or closed (stopped)
            self._w.send(b"\0")

    def idle(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when poked."""
        with contextlib.suppress(OSError, ValueError):
            if select.select([self.sock], [], [], seconds)[0]:
                drain(self.sock)

    def close(self) -> None:
        self.sock.close()
        self._w.close()


class SubWait:
    """An on_inbound() call made while connected, waiting for the broker's SUBACK."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.done = threading.Event()
        self.ok = False


def drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def network_pass(client: mqtt.Client, waker: Waker, timeout: float) -> bool:
    """One pass of paho's network loop (what ``Client.loop`` does, plus our wake socket); callbacks run here.
    Returns False when the connection is gone (paho has then called on_disconnect)."""
    sock = client.socket()
    if sock is None:
        return False
    # paho writes a byte to its own socket pair for every queued packet, to wake a loop_start() thread; nobody
    # else reads it here, so we drain it like paho's loop() does (else every send fails once it is full).
    paho_pair: socket.socket | None = getattr(client, "_sockpairR", None)
    rlist: list[Any] = [sock, waker.sock] if paho_pair is None else [sock, waker.sock, paho_pair]
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0  # TLS bytes already decrypted
    try:
        readable, writable, _ = select.select(
            rlist, [sock] if client.want_write() else [], [], 0.0 if pending else timeout
        )
    except (OSError, ValueError, TypeError):
        readable, writable = [sock], []  # a closed socket: let loop_read find out and report it
    for extra in (waker.sock, paho_pair):
        if extra is not None and extra in readable:
            drain(extra)
    ok = mqtt.MQTT_ERR_SUCCESS
    if (sock in readable or pending) and (client.loop_read() != ok or client.socket() is None):
        return False
    if (writable or client.want_write()) and (client.loop_write() != ok or client.socket() is None):
        return False
    return client.loop_misc() == ok and client.socket() is not None  # keepalive PINGREQ / timeout


def max_packet_bytes(cfg: LinkConfig) -> int:
    """The largest packet the link reads: announced to MQTT 5 brokers, enforced by :class:`BoundedClient`."""
    return cfg.inbound_max_bytes + PACKET_OVERHEAD


def new_client(
    cfg: LinkConfig,
    *,
    protocol: int,
    client_id: str,
    will_topic: str,
    will_payload: bytes,
    on_oversize: OversizeHandler,
) -> BoundedClient:
    """A paho client for one protocol version, without callbacks; unusable TLS files raise LinkError."""
    v5 = protocol == mqtt.MQTTv5
    client = BoundedClient(
        CallbackAPIVersion.VERSION2,
        max_packet=max_packet_bytes(cfg),
        on_oversize=on_oversize,
        client_id=client_id,
        protocol=protocol,
        clean_session=None if v5 else False,
        reconnect_on_failure=False,  # reconnecting is ours: jittered backoff, injectable clock, reasons
    )
    # paho puts at most inflight_window messages on the wire; the link hands it up to twice that, so that each
    # PUBACK releases the next publish inside paho's own read loop and the pipe never runs dry.
    client.max_inflight_messages_set(cfg.inflight_window)
    client.max_queued_messages_set(0)
    client.connect_timeout = cfg.connect_timeout_s
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.ca_file is not None:
        try:
            client.tls_set_context(tls_context(cfg))
        except (OSError, ValueError) as exc:
            raise LinkError(f"link: TLS files unusable ({cfg.ca_file}, {cfg.client_cert}): {exc}") from None
    client.will_set(will_topic, will_payload, qos=1, retain=True)
    return client
