"""One-line reasons for failed connection attempts, by kind: dns, refused, tls, timeout, network, protocol."""

from __future__ import annotations

import socket
import ssl

from edgeguard.link._config import LinkConfig

__all__ = ["connect_error_reason", "no_connack_reason"]


def connect_error_reason(exc: BaseException, config: LinkConfig) -> tuple[str, str]:
    """What connect() raised (name lookup, TCP, TLS handshake) -> (reason, kind)."""
    where = f"{config.host}:{config.port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve broker host {config.host!r} ({exc.strerror})", "dns"
    if isinstance(exc, ssl.SSLCertVerificationError):
        name = config.tls_server_name
        checked = f" for link.tls_server_name {name!r}" if name is not None else ""
        return f"TLS: broker certificate rejected{checked} ({exc.verify_message})", "tls"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed ({exc.reason or exc})", "tls"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and config.ca_file is not None:
        return f"TLS: {where} closed the connection during the handshake (certificate refused?)", "tls"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (no broker listening?)", "refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out connecting to {where}", "timeout"
    if isinstance(exc, OSError):
        return f"cannot connect to {where} ({exc.strerror or exc})", "network"
    return f"cannot connect to {where} ({type(exc).__name__}: {exc})", "network"


def no_connack_reason(paho_errors: list[str], *, tls: bool) -> tuple[str, str]:
    """The connection closed (or stayed silent) before CONNACK -> (reason, kind).

    With TLS 1.3 the handshake completes on our side before the broker checks our certificate, so a refused
    client certificate shows up here, as a closed connection, not as a handshake error."""
    tls_errors = [e for e in paho_errors if any(w in e.lower() for w in ("ssl", "alert", "certif"))]
    if tls_errors:
        return f"TLS: broker refused our client certificate ({tls_errors[0]})", "tls"
    if tls:
        return "TLS: broker hung up after the handshake (client certificate refused?)", "tls"
    why = paho_errors[0] if paho_errors else "no CONNACK within connect_timeout_s"
    return f"connection closed before CONNACK ({why})", "protocol"
