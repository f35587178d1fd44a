"""A real device service (`edgeguard run`, a small zoo model) through RabbitMQ's MQTT plugin and NATS's MQTT
support, unchanged: birth/LWT status, heartbeats, results at QoS 1 with the connection cut mid-stream, an
oversize input, a signed command answered and verified, and `edgeguard fleet status --json` seeing the device.
The device reaches the broker through a TCP proxy the test cuts (the broker sees the device vanish with no
DISCONNECT: the LWT fires), and the broker itself is killed (-9) mid-stream and started again; the operator
side talks to the broker directly. Each broker is started once per session (tests/support/brokers.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeguard import zoo
from edgeguard.fleet.commands import CommandSender
from edgeguard.keys import load_verify_key
from edgeguard.link import LinkConfig
from tests.commands._support import FLEET, commands_device, deliver, sign
from tests.fleet._sim import edgeguard
from tests.fleet._support import TcpProxy
from tests.service._env import seal
from tests.support.broker import Recorder
from tests.support.brokers import ExternalBroker

# A small real model from the zoo: PP-OCR's text direction classifier (ONNX, 0.59 MB; x [1,3,48,192] -> 2
# class scores), sealed for the device like any bundle.
CLS_META: dict[str, Any] = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 48, 192], "range": [-1.0, 1.0]}],
    "outputs": [{"name": "save_infer_model/scale_0.tmp_1", "dtype": "float32", "shape": [1, 2]}],
}
_PIXELS = json.dumps(np.linspace(-0.5, 0.5, 3 * 48 * 192, dtype=np.float32).reshape(1, 3, 48, 192).round(3)
                     .tolist()).encode()


def cls_bundle(root: Path) -> bytes:
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    return seal(root, zoo.fetch("ppocr-cls").read_bytes(), name="ppocr-cls", version=1, meta=CLS_META,
                golden_in={"x": x})


def body(n: int) -> bytes:
    return b'{"id": "r%d", "inputs": {"x": %s}}' % (n, _PIXELS)
MQTT311 = mqtt.MQTTv311
STATUS_TOPIC = f"edgeguard/v1/{FLEET}/dev-1/status"


def retained(broker: ExternalBroker, topic: str, wait_s: float = 3.0) -> list[bytes]:
    """What a new client subscribing to exactly ``topic`` is handed as retained (waits ``wait_s`` after its
    SUBACK: a broker sends retained messages right behind the SUBACK)."""
    got: list[bytes] = []
    subacked: list[int] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ret-{time.monotonic_ns()}", protocol=MQTT311)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload)) if m.retain else None
    c.on_subscribe = lambda *_a: subacked.append(1)
    c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    try:
        deadline = time.monotonic() + 20
        while not subacked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert subacked, f"no SUBACK for {topic}"
        time.sleep(wait_s)
        return list(got)
    finally:
        c.disconnect()
        c.loop_stop()


def clear_retained(broker: ExternalBroker, topic: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"clr-{time.monotonic_ns()}", protocol=MQTT311)
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    try:
        c.publish(topic, b"", qos=1, retain=True).wait_for_publish(20)
    finally:
        c.disconnect()
        c.loop_stop()


def publish(broker: ExternalBroker, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}", protocol=MQTT311)
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def rejected(rec: Recorder) -> list[dict[str, Any]]:
    events = (json.loads(p) for p in rec.on_topic("/dev-1/events"))
    return [e for e in events if e["kind"] == "input-rejected"]


def states(rec: Recorder) -> list[str]:
    return [json.loads(p)["state"] for p in rec.on_topic("/dev-1/status") if p]


def results(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(p) for p in rec.on_topic("/dev-1/results")]


def test_device_service_through_the_broker_unchanged(clusterable: ExternalBroker, tmp_path: Path) -> None:
    broker = clusterable
    clear_retained(broker, STATUS_TOPIC)  # a previous run of this test in the same session left one
    proxy = TcpProxy((broker.host, broker.port))
    front = SimpleNamespace(host="127.0.0.1", port=proxy.port, tls=None)
    rec = Recorder(broker, f"edgeguard/v1/{FLEET}/#", qos=1)  # type: ignore[arg-type]
    dev, ops = commands_device(tmp_path, front)  # type: ignore[arg-type]
    (tmp_path / "model.egm").write_bytes(cls_bundle(tmp_path))  # instead of the generated sensor model
    dev.start()
    try:
        dev.wait_ready()
        # -- birth status, retained; heartbeats; the link fell back to 3.1.1 by itself (protocol = auto)
        assert rec.wait_for(lambda _m: "online" in states(rec), 60), rec.snapshot()[-5:]
        kept = retained(broker, STATUS_TOPIC)
        assert [json.loads(p)["state"] for p in kept] == ["online"], kept
        assert rec.wait_for(lambda _m: len(rec.on_topic("/dev-1/heartbeat")) >= 2, 60)
        beat = json.loads(rec.on_topic("/dev-1/heartbeat")[-1])
        assert beat["link"]["protocol"] == "3.1.1" and beat["link"]["connected"] is True, beat["link"]

        # -- results at QoS 1, the device's connection cut mid-stream and restored
        total, sent = 65, 0

        def post(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                code, answer = dev.request("POST", "/v1/infer", body(sent))
                assert code == 200, answer
                assert answer["correlation_id"] == f"r{sent}", answer
                sent += 1

        post(15)
        assert rec.wait_for(lambda _m: len(results(rec)) >= 5, 60)
        proxy.cut()
        # the broker saw the device vanish without DISCONNECT: its will, "offline", is published
        assert rec.wait_for(lambda _m: states(rec)[-1:] == ["offline"], 60), states(rec)
        post(15)  # kept in the outbox while cut
        proxy.restore()
        assert rec.wait_for(lambda _m: states(rec)[-1:] == ["online"], 60), states(rec)
        post(10)
        # the broker itself killed (-9) mid-stream and started again on the same port with its stored state
        # (the recorder's persistent session, the device's queued and retained messages)
        broker.kill()
        post(10)
        broker.start()
        post(total - 50)
        assert rec.wait_for(lambda _m: len({r["id"] for r in results(rec)}) >= total, 90), (
            f"{len({r['id'] for r in results(rec)})}/{total} results; {dev.log_tail()}"
        )
        got = results(rec)
        ids = [r["id"] for r in got]
        assert len(set(ids)) == total, ids
        # every result exactly once by id: first sightings in increasing seq, duplicates only of ids seen
        seen: list[int] = []
        for r in got:
            if r["seq"] not in seen:
                assert not seen or r["seq"] > seen[-1], (r["seq"], seen[-3:])
                seen.append(r["seq"])
        assert len(seen) == total
        corr = sorted(int(r["data"]["correlation_id"][1:]) for r in {r["id"]: r for r in got}.values())
        assert corr == list(range(total)), corr

        # -- an input larger than link.inbound_max_bytes (1 MiB): no MQTT 5 Maximum Packet Size on these
        # brokers, so the device's own reader discards it in chunks, says so, and stays connected
        # (connections counted in the service's log: heartbeats are QoS 0, which a broker may deliver ahead of
        # or behind QoS 1 messages, so the last one seen can predate the latest reconnect)
        connected = lambda: (tmp_path / "service.log").read_text().count("link: connected to")  # noqa: E731
        connects = connected()
        publish(broker, f"edgeguard/v1/{FLEET}/dev-1/input", b"x" * (2 * 1024 * 1024))
        assert rec.wait_for(lambda _m: any("packet of" in e.get("reason", "") for e in rejected(rec)), 60)
        publish(broker, f"edgeguard/v1/{FLEET}/dev-1/input", body(999))
        assert rec.wait_for(lambda _m: any(r["data"]["correlation_id"] == "r999" for r in results(rec)), 60)
        link = lambda: json.loads(rec.on_topic("/dev-1/heartbeat")[-1])["link"]  # noqa: E731
        assert rec.wait_for(lambda _m: link()["inbound_dropped"] >= 1, 30), link()
        assert link()["connected"] and connected() == connects, dev.log_tail()

        # -- a signed command, answered over the same broker and verified with the device's key
        s = CommandSender(
            broker=LinkConfig(host=broker.host, port=broker.port, protocol="3.1.1"),
            fleet=FLEET,
            pinned={"dev-1": load_verify_key(tmp_path / "state/device-sign.pub", "device-sign")},
        )
        s.connect()
        try:
            pong = deliver(s, sign(ops, "ping")).answer
            assert pong is not None and pong.verdict == "verified" and pong.ok, pong
            assert pong.doc["result"] == {"pong": True}
        finally:
            s.close()

        # -- the command line to the whole fleet: the targets come from retained statuses on a wildcard
        # subscription, which RabbitMQ never hands over (it says so); NATS does (the key is learned there)
        key = str(tmp_path / "ops/operator.key")
        out = edgeguard(
            "fleet", "send", "ping", "--to", "all", "--sign-key", key, "--fleet", FLEET,
            "--broker", f"{broker.host}:{broker.port}", "--protocol", "3.1.1", "--timeout", "20", "--json",
        )
        if broker.kind == "rabbitmq":
            assert out.returncode == 1 and json.loads(out.stdout)["answers"] == [], out.stdout
            assert "no device status seen at all" in out.stderr and "--to ID" in out.stderr, out.stderr
        else:
            doc = json.loads(out.stdout)
            assert out.returncode == 0 and doc["ok"] is True, (out.stdout, out.stderr)
            assert doc["answers"][0]["verdict"] == "verified (learned key)", doc

        # -- the operator's view sees the device (heartbeats; the status too where the broker hands it over)
        out = edgeguard("fleet", "status", "--broker", f"{broker.host}:{broker.port}", "--fleet", FLEET,
                        "--json", "--wait", "5")
        assert out.returncode in (0, 1), out.stderr
        doc = json.loads(out.stdout)
        row = next(d for d in doc["devices"] if d["device"] == "dev-1")
        assert row["heartbeat_age_s"] is not None and row["model"] == "ppocr-cls", row
    finally:
        dev.stop()
        rec.close()
        proxy.close()
    # a clean stop publishes the offline status itself, retained
    assert [json.loads(p)["state"] for p in retained(broker, STATUS_TOPIC, 1.0)] == ["offline"]
