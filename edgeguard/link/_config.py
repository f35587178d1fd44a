"""MQTT link configuration and state."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeguard.errors import ConfigError

__all__ = ["LinkConfig", "LinkState", "Backoff", "TOPIC_SEGMENT"]

# A topic level we build or accept: no wildcards, no empty levels, nothing MQTT treats specially.
TOPIC_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# A DNS name as certificates carry it (RFC 1123 labels); IP addresses need no tls_server_name.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"link.{key}: {why}")


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """Broker settings and link timing; every key is checked here (see docs/link.md).

    host / port: the broker. protocol: "auto" (MQTT 5, falling back to 3.1.1 when the broker refuses 5),
        "5" or "3.1.1".
    username / password: optional credentials. ca_file: enables TLS, verifying the broker against this CA.
    client_cert / client_key: mutual TLS (both or neither; needs ca_file). The broker certificate must name
        ``host`` (DNS name or IP address), or ``tls_server_name`` when that is set.
    tls_server_name: the name sent as SNI and checked against the broker certificate instead of ``host``
        (a broker reached by IP address whose certificate names only its DNS name; needs ca_file).
    keepalive_s: MQTT keepalive. session_expiry_s: how long the broker keeps our session (MQTT 5).
    heartbeat_s: heartbeat period. inflight_window: results published and not yet acknowledged (paho scans
        its in-flight list on every ack, so a small window is faster; see docs/link.md).
    backoff_initial_s / backoff_max_s: reconnect delay bounds (exponential, jittered).
    connect_timeout_s: one connection attempt, TCP + TLS + CONNACK. stop_timeout_s: how long stop() waits for
        the offline status to be acknowledged. startup_wait_s: how long start() waits for the first attempt.
    inbound_max_bytes: largest inbound message handed to a handler.
    events_max_queued: events kept while offline.
    ha_discovery / ha_prefix: publish Home Assistant MQTT discovery configs (retained) under ha_prefix.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    heartbeat_s: float = 30.0
    inflight_window: int = 20
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 3.0
    startup_wait_s: float = 3.0
    inbound_max_bytes: int = 256 * 1024
    events_max_queued: int = 256
    ha_discovery: bool = False
    ha_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        _check(
            bool(self.host) and len(self.host) <= 253 and " " not in self.host, "host", "must be a host name"
        )
        _check(1 <= self.port <= 65535, "port", "must be 1..65535")
        _check(self.protocol in ("auto", "5", "3.1.1"), "protocol", "must be auto, 5 or 3.1.1")
        _check(self.client_id is None or 1 <= len(self.client_id) <= 128, "client_id", "must be 1..128 chars")
        _check(self.password is None or self.username is not None, "password", "needs a username")
        _check(
            (self.client_cert is None) == (self.client_key is None),
            "client_cert",
            "needs client_key (and back)",
        )
        _check(
            self.client_cert is None or self.ca_file is not None, "client_cert", "mutual TLS needs ca_file"
        )
        _check(
            self.tls_server_name is None or self.ca_file is not None, "tls_server_name", "needs ca_file (TLS)"
        )
        _check(
            self.tls_server_name is None or _HOST_NAME.fullmatch(self.tls_server_name) is not None,
            "tls_server_name",
            "must be a host name (letters, digits, '-', dot-separated)",
        )
        _check(5 <= self.keepalive_s <= 3600, "keepalive_s", "must be 5..3600 s")
        _check(0 <= self.session_expiry_s <= 0xFFFFFFFF, "session_expiry_s", "must be 0..4294967295 s")
        for key, lo, hi in (
            ("heartbeat_s", 0.1, 86400.0),
            ("backoff_initial_s", 0.01, 60.0),
            ("backoff_max_s", 0.01, 3600.0),
            ("connect_timeout_s", 0.1, 120.0),
            ("stop_timeout_s", 0.0, 60.0),
            ("startup_wait_s", 0.0, 120.0),
        ):
            v = float(getattr(self, key))
            _check(math.isfinite(v) and lo <= v <= hi, key, f"must be {lo}..{hi} s")
        _check(self.backoff_max_s >= self.backoff_initial_s, "backoff_max_s", "must be >= backoff_initial_s")
        _check(1 <= self.inflight_window <= 1000, "inflight_window", "must be 1..1000")
        _check(16 <= self.inbound_max_bytes <= 256 * 1024 * 1024, "inbound_max_bytes", "must be 16..256 MiB")
        _check(1 <= self.events_max_queued <= 100_000, "events_max_queued", "must be 1..100000")
        _check(
            all(TOPIC_SEGMENT.fullmatch(p) for p in self.ha_prefix.split("/")),
            "ha_prefix",
            "bad topic prefix",
        )


@dataclass(frozen=True)
class LinkState:
    """A snapshot for status and heartbeat. ``error`` is the one-line reason of the last failed attempt."""

    connected: bool
    error: str | None
    error_kind: str | None
    protocol: str
    connects: int
    attempts: int
    published: int
    acked: int
    inflight: int
    rejected: int
    inbound_dropped: int
    events_dropped: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Backoff:
    """Exponential reconnect delay with "equal jitter" (half fixed, half random), so a fleet that lost the
    same broker does not come back in lockstep. ``rng`` is injectable for tests."""

    def __init__(self, initial: float, maximum: float, rng: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return float(ceiling / 2 + self._rng() * ceiling / 2)

    def reset(self) -> None:
        self.failures = 0
