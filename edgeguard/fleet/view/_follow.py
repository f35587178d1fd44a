"""One MQTT subscription that feeds a FleetState: retained status, heartbeats and events of a fleet.

paho runs its own network thread (``loop_start``; it reconnects by itself and we subscribe again on every
connect). Messages go straight into ``FleetState.ingest`` in that thread; the caller's ``on_event`` gets the
events it returns and must not block (``fleet watch`` hands them to a bounded queue).

The end of the retained snapshot: MQTT has no marker for it, but the broker answers SUBSCRIBE packets in
order and queues a subscription's retained messages right behind its SUBACK, so the SUBACK of a second,
later SUBSCRIBE (to a topic nothing is published on) arrives after every retained message of the first.
That holds for QoS 0 deliveries, which is why the view subscribes at QoS 0: it wants the latest state, not
every message (a QoS 1 delivery could wait behind the broker's in-flight window and arrive after the barrier).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.errors import LinkError
from edgeguard.fleet.view._state import RESERVED, FleetEvent, FleetState

__all__ = ["BrokerOptions", "Follower", "fleet_filters"]

_BARRIER = "edgeguard/v1/$view-barrier"  # no device can publish here: `$` is outside the segment charset


@dataclass(frozen=True, kw_only=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    client_id: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError("broker port must be 1..65535")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.client_cert is not None and self.ca_file is None:
            raise ValueError("--tls-cert needs --tls-ca")


def fleet_filters(fleet: str) -> list[str]:
    return [f"edgeguard/v1/{fleet}/+/{kind}" for kind in ("status", "heartbeat", "events")]


class Follower:
    def __init__(
        self,
        *,
        broker: BrokerOptions,
        fleet: str,
        state: FleetState,
        on_event: Callable[[FleetEvent], None] | None = None,
        wall: Callable[[], float] = time.time,
        extra_filters: Sequence[str] = (),
        on_message: Callable[[str, bytes, float, bool], None] | None = None,
    ) -> None:
        """``extra_filters``: more topics to follow on the same session (the dashboard adds results and
        rollouts); ``on_message(topic, payload, now, retained)`` sees every message after the state took it
        (paho's thread: it must not block, and it must not raise)."""
        if fleet != "+" and ("/" in fleet or "#" in fleet or "+" in fleet or not fleet):
            raise ValueError(f"fleet {fleet!r}: a fleet name, or + for every fleet")
        self.broker = broker
        self.fleet = fleet
        self.state = state
        self._on_event = on_event
        self._on_message_hook = on_message
        self._extra_filters = tuple(extra_filters)
        self._wall = wall
        self._snapshot = threading.Event()
        self._connected = threading.Event()
        self._barrier_mid: int | None = None
        self._refused: str | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=broker.client_id or "",
            protocol=mqtt.MQTTv311,
            clean_session=True,  # a view wants the current state, not what it missed while away
        )
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and host name checks
            ctx.load_verify_locations(cafile=str(broker.ca_file))
            if broker.client_cert is not None:
                ctx.load_cert_chain(str(broker.client_cert), str(broker.client_key))
            self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho's thread ------------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            self._refused = f"broker refused the connection ({rc})"
            self._connected.set()
            return
        self._refused = None
        client.subscribe([(f, 0) for f in (*fleet_filters(self.fleet), *self._extra_filters)])
        _rc, self._barrier_mid = client.subscribe(_BARRIER, qos=0)
        self._connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _rcs: Any, _p: Any = None) -> None:
        if mid == self._barrier_mid:
            self._snapshot.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""  # matches nothing: counted as dropped
        payload, now = bytes(msg.payload), self._wall()
        # A message on an extra filter (results, rollouts) is not the view's to judge: not counted dropped.
        parts = topic.split("/")
        extra = bool(self._extra_filters) and (
            len(parts) != 5 or parts[4] not in ("status", "heartbeat", "events") or parts[3] in RESERVED
        )
        event = None if extra else self.state.ingest(topic, payload, now, retained=bool(msg.retain))
        if event is not None and self._on_event is not None:
            self._on_event(event)
        if self._on_message_hook is not None:
            self._on_message_hook(topic, payload, now, bool(msg.retain))

    # the caller's thread ------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Connect and wait until the retained snapshot is in. LinkError (one line) when that fails."""
        where = f"{self.broker.host}:{self.broker.port}"
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"cannot connect to the broker at {where}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise LinkError(f"no answer from the broker at {where} within {timeout:g} s")
        if self._refused is not None:
            self.stop()
            raise LinkError(f"{where}: {self._refused}")
        if not self._snapshot.wait(timeout):
            self.stop()
            raise LinkError(f"the broker at {where} did not confirm the subscription within {timeout:g} s")

    def wait_heartbeats(self, seconds: float) -> None:
        """Listen up to ``seconds`` more, returning early once every known online device has sent a
        heartbeat (retained status says who exists; heartbeats carry the figures)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            views = self.state.snapshot()
            if views and all(v.last_heartbeat is not None for v in views if v.online is not False):
                return
            time.sleep(0.05)  # polling the view a few times per second; nothing to wake us on

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
