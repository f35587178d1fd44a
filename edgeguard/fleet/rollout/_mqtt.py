"""The rollout's MQTT side: one paho session that publishes the bundle's chunks, signed commands and the
retained progress, and turns what devices publish into observations (``_observe.py``).

Inbound messages are parsed in paho's thread and queued (bounded: on overflow counted and dropped, never
grown; a dropped heartbeat is repeated by the next one, and an answer lost this way ends as "no answer").
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard.deploy import DEFAULT_CHUNK_SIZE, bundle_messages, removal_messages
from edgeguard.errors import LinkError
from edgeguard.fleet.commands import sign_command
from edgeguard.link import LinkConfig, tls_context

from ._observe import Observation, parse_unverified_message

__all__ = ["MqttTransport"]

_QUEUE = 10_000


class MqttTransport:
    def __init__(
        self,
        *,
        broker: LinkConfig,
        fleet: str,
        sign_key: Ed25519PrivateKey,
        pinned: Mapping[str, Ed25519PublicKey],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        command_ttl_s: int = 600,
        publish_timeout_s: float = 60.0,
    ) -> None:
        self.fleet = fleet
        self.prefix = f"edgeguard/v1/{fleet}"
        self._base = self.prefix + "/"
        self._broker = broker
        self._key = sign_key
        self._pinned = dict(pinned)
        self._chunk_size = chunk_size
        self._ttl = command_ttl_s
        self._publish_timeout = publish_timeout_s
        self._inbox: queue.Queue[Observation] = queue.Queue(maxsize=_QUEUE)
        self.dropped = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._refused: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv311 if broker.protocol == "3.1.1" else mqtt.MQTTv5,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            client.tls_set_context(tls_context(broker))
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- paho's thread
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            self._refused = f"broker refused the connection ({rc})"
            self._connected.set()
            return
        _rc, self._sub_mid = client.subscribe(
            [(self._base + "+/cmd/resp", 1), (self._base + "+/events", 1), (self._base + "+/heartbeat", 0)]
        )
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any = None) -> None:
        if mid == self._sub_mid:
            self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            obs = parse_unverified_message(self._base, msg.topic, bytes(msg.payload), pinned=self._pinned)
        except UnicodeDecodeError:  # a topic that is not UTF-8: nothing of ours
            return
        if obs is None:
            return
        try:
            self._inbox.put_nowait(obs)
        except queue.Full:
            self.dropped += 1

    # -- the caller's thread
    def connect(self, timeout: float = 15.0) -> None:
        b = self._broker
        try:
            self._client.connect(b.host, b.port, keepalive=b.keepalive_s)
        except OSError as exc:
            raise LinkError(f"cannot connect to {b.host}:{b.port}: {exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise LinkError(f"no CONNACK from {b.host}:{b.port} within {timeout:g} s")
        if self._refused is not None:
            self.close()
            raise LinkError(f"{b.host}:{b.port}: {self._refused}")
        if not self._subscribed.wait(timeout):
            self.close()
            raise LinkError(f"no SUBACK from {b.host}:{b.port} within {timeout:g} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + self._publish_timeout
        while not info.is_published():  # paho resends after a reconnect; we wait for the PUBACK
            if time.monotonic() > deadline:
                raise LinkError(f"no PUBACK for {topic} within {self._publish_timeout:g} s")
            info.wait_for_publish(0.5)

    def publish_bundle(self, data: bytes) -> None:
        """Chunks first, the manifest last: a device that sees the manifest finds every chunk retained."""
        sha256 = hashlib.sha256(data).hexdigest()
        # The format's one writer, shared with the device's reader (edgeguard.deploy).
        for topic, payload in bundle_messages(self.prefix, data, sha256, self._chunk_size):
            self._publish(topic, payload, retain=True)

    def remove_bundle(self, sha256: str, size: int) -> None:
        chunks = -(-size // self._chunk_size)
        for topic, payload in removal_messages(self.prefix, sha256, chunks):  # the manifest first
            self._publish(topic, payload, retain=True)

    def send(self, device: str, name: str, args: Mapping[str, str]) -> str:
        cmd = sign_command(
            self._key,
            fleet=self.fleet,
            target=("device", device),
            name=name,
            args=args,
            now=int(time.time()),
            ttl_s=self._ttl,
        )
        self._client.publish(f"{self._base}{device}/cmd", cmd.data, qos=1)
        return cmd.nonce

    def poll(self, timeout: float) -> list[Observation]:
        out: list[Observation] = []
        try:
            out.append(self._inbox.get(timeout=timeout))
            while len(out) < 1000:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def publish_progress(self, rollout_id: str, doc: Mapping[str, object]) -> None:
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self._publish(f"{self._base}rollouts/{rollout_id}", body, retain=True)
