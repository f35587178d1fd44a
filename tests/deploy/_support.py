"""Deploy tests on real components: a provisioned device service with [commands] enabled serving a real zoo
model (BlazeFace, sealed with the repo's packer), an operator that publishes bundles as retained chunks and
sends signed ``deploy`` / ``rollback`` commands.

Reusable by other tests (the rollout tests): :func:`publish_chunks`, :func:`send_deploy`, :func:`deploy_args`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard import zoo
from edgeguard.bundle import pack_bundle
from edgeguard.deploy import bundle_messages, publish_bundle
from edgeguard.fleet.commands import CommandSender, Delivery
from edgeguard.keys import load_publisher_key, load_recipient_key
from tests.commands._support import FLEET, commands_device, deliver, sender, sign
from tests.service._env import STATUS, Device, ensure_keys
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

PREFIX = f"edgeguard/v1/{FLEET}"
CHUNK = 16 * 1024  # small chunks: a 229 KB model travels in 15 of them


def blazeface_bundle(
    root: Path, version: int, *, golden_out: Mapping[str, np.ndarray] | None = None
) -> bytes:
    """The zoo's BlazeFace (TFLite, 229 KB) sealed for this device by the repo's packer."""
    image = np.random.default_rng(7).random((1, 128, 128, 3), dtype=np.float32)
    ensure_keys(root)
    return pack_bundle(
        zoo.fetch("blazeface").read_bytes(),
        name="blazeface",
        version=version,
        sign_key=load_publisher_key(root / "keys/publisher.key"),
        recipients=[load_recipient_key(root / "keys/device.pub")],
        golden=[{"in": {"input": image}, "out": dict(golden_out or {})}],
    )


def deploy_device(
    root: Path, broker: MosquittoBroker, *, first: bytes | None = None, deploy_extra: str = ""
) -> tuple[Device, Ed25519PrivateKey]:
    """Provisioned (not started), serving BlazeFace v1 (or ``first``), operator key ``ops`` trusted."""
    dev, ops = commands_device(root, broker)
    (root / "model.egm").write_bytes(first if first is not None else blazeface_bundle(root, 1))
    # BlazeFace's raw outputs (896 anchors) make a ~290 KB result
    text = dev.config.read_text() + "\n[outbox]\nmax_payload_bytes = 1048576\n"
    text += f"\n[deploy]\nfetch_stall_s = {scaled(60.0):g}\nmin_requests = 5\n"
    dev.config.write_text(text + deploy_extra)
    return dev, ops


def publish_chunks(
    broker: MosquittoBroker,
    data: bytes,
    *,
    chunk_size: int = CHUNK,
    only: Callable[[str], bool] | None = None,
    as_sha256: str | None = None,
) -> str:
    """Publish a sealed bundle's chunks and meta, retained QoS 1 (``only``: a filter on the topic's last
    level, for a partial transfer; ``as_sha256``: under another bundle's digest, as an attacker replacing it
    would). Returns the digest it was published under."""
    cid = f"publisher-{os.getpid()}-{time.monotonic_ns()}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        sha = as_sha256 or hashlib.sha256(data).hexdigest()
        if only is None and as_sha256 is None:
            publish_bundle(client, PREFIX, data, chunk_size=chunk_size)
        else:
            keep = only or (lambda level: True)
            infos = [client.publish(t, p, qos=1, retain=True)
                     for t, p in bundle_messages(PREFIX, data, sha, chunk_size) if keep(t.rsplit("/", 1)[1])]
            for info in infos:
                info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()
    return sha


def deploy_args(data: bytes, *, source: str = "mqtt", **extra: Any) -> dict[str, str]:
    args = {"sha256": hashlib.sha256(data).hexdigest(), "size": str(len(data)), "source": source}
    args.update({k: str(v) for k, v in extra.items()})
    return args


def send_deploy(
    sender: CommandSender,
    key: Ed25519PrivateKey,
    args: Mapping[str, str],
    *,
    device: str = "dev-1",
    timeout: float = 180.0,
) -> Delivery:
    """A signed ``deploy`` command to one running device; returns its verified answer (the test fails when
    none comes: the device answers once the bundle is fetched, verified, self-tested and switched to)."""
    cmd = sign(key, "deploy", to=device, args=args, ttl_s=600)
    return deliver(sender, cmd, device, timeout=scaled(timeout))


def health(dev: Device) -> dict[str, Any]:
    code, doc = dev.request("GET", "/v1/health", token=STATUS, timeout=10)
    assert code in (200, 503), (code, doc)
    return dict(doc)


def serving_version(dev: Device) -> int | None:
    try:
        doc = health(dev)
    except (OSError, ValueError, AssertionError):
        return None
    model = doc.get("model")
    return int(model["version"]) if doc.get("state") == "serving" and isinstance(model, dict) else None


def deploy_state(dev: Device) -> dict[str, Any]:
    return dict(health(dev)["deploy"])


def infer(dev: Device) -> tuple[int, Any]:
    x = np.zeros((1, 128, 128, 3), np.float32)
    body = json.dumps({"inputs": {"input": x.tolist()}}).encode()
    return dev.request("POST", "/v1/infer", body, timeout=60)


def kill_service(dev: Device) -> None:
    """A power cut: SIGKILL to the supervisor and its worker (the service runs in its own session)."""
    assert dev.proc is not None
    os.killpg(dev.proc.pid, signal.SIGKILL)
    dev.proc.wait(30)
    dev.log.close()
    if dev.notify is not None:
        sock, dev.notify = dev.notify, None
        sock.close()
    dev.notes.clear()


def online_sender(broker: MosquittoBroker, dev: Device) -> CommandSender:
    """A connected operator sender, once the device's link is up: READY does not wait for the broker, and a
    command published before the device subscribed to its ``cmd`` would be lost."""
    s = sender(broker, dev.root)
    dev.wait(lambda: s.statuses.get("dev-1", {}).get("state") == "online", scaled(60), "the device online")
    return s
