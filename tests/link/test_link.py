"""The MQTT link against a real mosquitto started by the test, with an independent recording subscriber."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeguard.errors import ConfigError, LinkError
from edgeguard.link import Backoff, LinkConfig, MqttLink
from edgeguard.link._discovery import discovery_messages
from edgeguard.outbox import Outbox, OutboxConfig
from tests.link._mqtt311_gate import Mqtt311OnlyGate
from tests.link._slow_broker import SlowBroker
from tests.support.broker import MosquittoBroker, Pki, Recorder

ROOT = Path(__file__).resolve().parents[2]
USERS = {"dev": "devpw", "rec": "recpw"}
REC_ONLY = {"rec": "recpw"}
PREFIX = "edgeguard/v1/fleet/dev/"


def config(broker: MosquittoBroker, **kw: Any) -> LinkConfig:
    base: dict[str, Any] = dict(
        port=broker.port,
        username="dev",
        password="devpw",
        keepalive_s=5,
        heartbeat_s=0.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.4,
        connect_timeout_s=3.0,
        startup_wait_s=3.0,
    )
    base.update(kw)
    return LinkConfig(**base)


def outbox(tmp_path: Path, **kw: Any) -> Outbox:
    return Outbox(
        path=tmp_path / "outbox.db", storage_key=bytes(32), device_id="dev", config=OutboxConfig(**kw)
    )


class Results:
    """Parses the recorder's `results` messages incrementally and checks the delivery guarantee."""

    def __init__(self, rec: Recorder, *, strict_order: bool = True) -> None:
        self.rec = rec
        self.strict_order = strict_order
        self.index = 0
        self.order: list[int] = []  # first sighting of each seq, in arrival order
        self.seen: set[str] = set()
        self.duplicates = 0

    def update(self) -> None:
        msgs = self.rec.snapshot()
        for topic, payload in msgs[self.index :]:
            if not topic.endswith("/results"):
                continue
            body = json.loads(payload)
            if body["id"] in self.seen:
                self.duplicates += 1  # allowed: an id we have already seen
                continue
            assert not self.strict_order or not self.order or body["seq"] > self.order[-1], (
                f"out of order: {body['seq']} after {self.order[-1]}"
            )
            assert body["id"] == f"dev:{body['seq']}"
            self.seen.add(body["id"])
            self.order.append(body["seq"])
        self.index = len(msgs)

    def wait_all(self, ids: list[str], timeout: float = 60.0, acks: AckLog | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.update()
            missing = set(ids) - self.seen
            if not missing:
                return
            if time.monotonic() > deadline:
                where = "" if acks is None else f"; broker PUBACKs for them: {acks.explain(missing)}"
                raise AssertionError(
                    f"{len(missing)} acknowledged results never arrived, e.g. {sorted(missing)[:5]}{where}"
                )
            time.sleep(0.05)


class AckLog:
    """Records which seqs the link acknowledged to the outbox (broker PUBACK) and under which broker start, so
    a failure says whether a missing result was ever accepted by a broker (and which one) or never sent."""

    def __init__(self, ob: Outbox, broker: MosquittoBroker) -> None:
        self.by_seq: dict[int, int] = {}
        inner = ob.ack

        def ack(seqs: Any) -> None:
            seqs = list(seqs)
            for s in seqs:
                self.by_seq[s] = broker.starts
            inner(seqs)

        ob.ack = ack  # type: ignore[method-assign]

    def explain(self, missing: set[str]) -> str:
        seqs = sorted(int(m.split(":")[1]) for m in missing)
        return ", ".join(
            f"{s}@start{self.by_seq[s]}" if s in self.by_seq else f"{s}:never" for s in seqs[:10]
        )


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def restart_gated(broker: MosquittoBroker, rec: Recorder, down_s: float = 0.2) -> None:
    """kill -9 the broker and bring it back on the same port, admitting the device only once the recorder is
    subscribed again (the broker keeps no state across kill -9, so results sent before would reach nobody)."""
    n = rec.subscribed
    broker.kill()
    time.sleep(down_s)
    broker.start(users=REC_ONLY)
    rec.wait_subscribed(n + 1)
    broker.set_users(USERS)


@pytest.fixture
def gated(
    broker_factory: Callable[..., MosquittoBroker], recorder_factory: Callable[..., Recorder]
) -> tuple[MosquittoBroker, Recorder]:
    broker = broker_factory(users=USERS)
    rec = recorder_factory(broker, "edgeguard/#", username="rec", password="recpw")
    return broker, rec


def produce(ob: Outbox, n: int, acked: list[str], pause_every: int = 100) -> threading.Thread:
    def run() -> None:
        for i in range(n):
            acked.append(ob.put(json.dumps({"i": i}).encode()))
            if i % pause_every == 0:
                time.sleep(0.01)

    t = threading.Thread(target=run)
    t.start()
    return t


# ------------------------------------------------------------------------------------------------- outages
def test_broker_down_at_start_buffers_then_delivers(
    broker_factory: Callable[..., MosquittoBroker], recorder_factory: Callable[..., Recorder], tmp_path: Path
) -> None:
    broker = broker_factory(users=USERS, start=False)
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker, startup_wait_s=2.0), fleet="fleet", device_id="dev", outbox=ob)
    err = link.start()
    try:
        assert isinstance(err, LinkError) and "connection refused" in str(err)
        assert link.state.error_kind == "refused" and not link.state.connected
        t0 = time.monotonic()
        acked = [ob.put(b'{"offline":%d}' % i) for i in range(300)]
        assert time.monotonic() - t0 < 30  # the producer is never blocked by the missing broker
        broker.start(users=REC_ONLY)
        rec = recorder_factory(broker, "edgeguard/#", username="rec", password="recpw")
        broker.set_users(USERS)
        res = Results(rec)
        res.wait_all(acked)
        assert link.state.error is None and link.state.connected
        assert wait_until(lambda: ob.stats().depth == 0)
    finally:
        link.stop()
        ob.close()


def test_broker_killed_midstream_and_restarted(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ob = outbox(tmp_path)
    acks = AckLog(ob, broker)
    link = MqttLink(config=config(broker), fleet="fleet", device_id="dev", outbox=ob)
    assert link.start() is None
    acked: list[str] = []
    try:
        t = produce(ob, 3000, acked)
        for cut in (800, 1800):
            assert wait_until(lambda c=cut: link.state.acked >= c, 60)  # type: ignore[misc]
            restart_gated(broker, rec)
            assert wait_until(lambda: link.state.connected, 30)
        t.join()
        res = Results(rec)
        res.wait_all(acked, acks=acks)
        assert link.state.connects >= 3
        assert wait_until(lambda: ob.stats().depth == 0)
    finally:
        link.stop()
        ob.close()


@pytest.mark.slow
def test_broker_restarted_many_times_in_a_row(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ob = outbox(tmp_path)
    acks = AckLog(ob, broker)
    link = MqttLink(config=config(broker), fleet="fleet", device_id="dev", outbox=ob)
    link.start()
    acked: list[str] = []
    try:
        t = produce(ob, 2500, acked, pause_every=50)
        for _ in range(8):
            time.sleep(0.15)
            restart_gated(broker, rec, down_s=0.05)
        t.join()
        Results(rec).wait_all(acked, acks=acks)
    finally:
        link.stop()
        ob.close()


def test_device_process_killed_mid_burst_and_restarted(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    db = tmp_path / "outbox.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def spawn(count: int, start: int) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "tests.link._device", str(db), str(broker.port), str(count), str(start)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    acked: list[str] = []
    first = spawn(100_000, 0)
    second = None
    try:
        assert first.stdout is not None
        for line in first.stdout:
            acked.append(line.strip())
            if len(acked) >= 1500:
                break
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        acked += [ln.strip() for ln in first.stdout.read().splitlines() if ln.startswith("dev:")]
        # The broker saw the connection die without a DISCONNECT: the LWT says offline (retained).
        assert rec.wait_for(lambda m: any(t == PREFIX + "status" and b'"offline"' in p for t, p in m), 20)
        second = spawn(200, 100_000)
        assert second.stdout is not None
        for line in second.stdout:
            if line.strip() == "drained":
                break
            acked.append(line.strip())
        res = Results(rec)
        res.wait_all(acked)
        statuses = [json.loads(p)["state"] for p in rec.on_topic("/status")]
        assert statuses[-1] == "online" and "offline" in statuses
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_result_leaves_outbox_only_after_puback(
    broker_factory: Callable[..., MosquittoBroker], recorder_factory: Callable[..., Recorder], tmp_path: Path
) -> None:
    # An ACL that denies the results topic: MQTT 5 brokers answer with a PUBACK error, so nothing is removed.
    acl = tmp_path / "acl"
    acl.write_text("user rec\ntopic read #\nuser dev\ntopic write edgeguard/v1/fleet/dev/status\n")
    broker = broker_factory(users=USERS, extra_config=f"acl_file {acl}\n")
    rec = recorder_factory(broker, "edgeguard/#", username="rec", password="recpw")
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker), fleet="fleet", device_id="dev", outbox=ob)
    link.start()
    try:
        acked = [ob.put(b'{"n":%d}' % i) for i in range(30)]
        deadline = time.monotonic() + 10
        while link.state.rejected < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.state.rejected >= 1
        assert ob.stats().depth == 30  # refused results stay queued
        acl.write_text("user rec\ntopic read #\nuser dev\ntopic write edgeguard/#\n")
        broker.set_users(USERS)  # SIGHUP reloads the ACL file too
        # Results in flight when the ACL changed may be taken while an earlier one was refused: the refused
        # one is re-sent after them, so this is the one case without ordering (docs/link.md says so).
        Results(rec, strict_order=False).wait_all(acked)
        assert wait_until(lambda: ob.stats().depth == 0)
    finally:
        link.stop()
        ob.close()


# ------------------------------------------------------------------------------------- bad broker settings
def test_wrong_password_is_reported_and_retried(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker, password="wrong"), fleet="fleet", device_id="dev", outbox=ob)
    err = link.start()
    try:
        assert isinstance(err, LinkError)
        assert "refused credentials" in str(err) and "\n" not in str(err)
        assert link.state.error_kind == "auth"
        acked = [ob.put(b"{}") for _ in range(5)]  # still buffering
        attempts = link.state.attempts
        broker.set_users({**USERS, "dev": "wrong"})  # fix it on the broker side: the retry loop gets in
        Results(rec).wait_all(acked)
        assert link.state.attempts > attempts and link.state.error is None
    finally:
        link.stop()
        ob.close()


def test_unknown_host_is_reported(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    link = MqttLink(
        config=LinkConfig(host="no-such-broker.invalid", backoff_initial_s=0.05, startup_wait_s=5),
        fleet="fleet",
        device_id="dev",
        outbox=ob,
    )
    err = link.start()
    try:
        assert isinstance(err, LinkError) and "cannot resolve broker host" in str(err)
        assert link.state.error_kind == "dns"
        ob.put(b"{}")  # still accepted
    finally:
        link.stop()
        ob.close()


def test_tls_with_ca(
    broker_factory: Callable[..., MosquittoBroker],
    recorder_factory: Callable[..., Recorder],
    pki: Pki,
    tmp_path: Path,
) -> None:
    broker = broker_factory(tls=pki, users=USERS)
    rec = recorder_factory(broker, "edgeguard/#", username="rec", password="recpw")
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker, ca_file=pki.ca_cert), fleet="fleet", device_id="dev", outbox=ob)
    assert link.start() is None
    try:
        Results(rec).wait_all([ob.put(b'{"tls":true}')])
    finally:
        link.stop()
        ob.close()


def test_tls_untrusted_broker_certificate_refused(
    broker_factory: Callable[..., MosquittoBroker], pki: Pki, tmp_path: Path
) -> None:
    broker = broker_factory(tls=pki, users=USERS)
    ob = outbox(tmp_path)
    link = MqttLink(
        config=config(broker, ca_file=pki.rogue_ca_cert), fleet="fleet", device_id="dev", outbox=ob
    )
    err = link.start()
    try:
        assert isinstance(err, LinkError) and "broker certificate rejected" in str(err)
        assert link.state.error_kind == "tls"
    finally:
        link.stop()
        ob.close()


def test_mutual_tls(
    broker_factory: Callable[..., MosquittoBroker],
    recorder_factory: Callable[..., Recorder],
    pki: Pki,
    tmp_path: Path,
) -> None:
    broker = broker_factory(tls=pki, require_certificate=True)
    rec = recorder_factory(broker, "edgeguard/#", tls_client_cert=True)
    ob = outbox(tmp_path)
    cfg = config(
        broker,
        username=None,
        password=None,
        ca_file=pki.ca_cert,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    assert link.start() is None
    try:
        Results(rec).wait_all([ob.put(b'{"mtls":true}')])
    finally:
        link.stop()
        ob.close()


@pytest.mark.parametrize("which", ["rogue", "none"])
def test_mutual_tls_wrong_client_certificate_refused(
    broker_factory: Callable[..., MosquittoBroker], pki: Pki, tmp_path: Path, which: str
) -> None:
    broker = broker_factory(tls=pki, require_certificate=True)
    ob = outbox(tmp_path)
    certs: dict[str, Any] = (
        {"client_cert": pki.rogue_client_cert, "client_key": pki.rogue_client_key} if which == "rogue" else {}
    )
    cfg = config(broker, username=None, password=None, ca_file=pki.ca_cert, **certs)
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    err = link.start()
    try:
        assert isinstance(err, LinkError), link.state
        assert link.state.error_kind == "tls", err
        assert "certificate" in str(err).lower() or "alert" in str(err).lower()
        assert "\n" not in str(err)
    finally:
        link.stop()
        ob.close()


def test_unreadable_tls_files_fail_at_start(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    link = MqttLink(
        config=LinkConfig(ca_file=tmp_path / "missing.pem"), fleet="f", device_id="dev", outbox=ob
    )
    with pytest.raises(LinkError, match="TLS files unusable"):
        link.start()
    ob.close()


# ------------------------------------------------------------------------------- topics, status, inbound
def _last_state(messages: list[tuple[str, bytes]]) -> str | None:
    states = [json.loads(p)["state"] for t, p in messages if t.endswith("/status")]
    return states[-1] if states else None


def test_status_heartbeat_events_discovery_and_clean_stop(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ha = Recorder(broker, "homeassistant/#", username="rec", password="recpw")
    ob = outbox(tmp_path, max_count=5)
    link = MqttLink(
        config=config(broker, ha_discovery=True),
        fleet="fleet",
        device_id="dev",
        outbox=ob,
        health=lambda: {"model": "yolov8n", "inferences": 42},
    )
    assert link.start() is None
    try:
        ob.put_many([b"{}"] * 2)
        link.publish_event("fallback", {"from": "xnnpack", "to": "cpu"})
        assert rec.wait_for(lambda m: sum(t.endswith("/heartbeat") for t, _ in m) >= 2, 10)
        hb = json.loads(rec.on_topic("/heartbeat")[-1])
        assert hb["model"] == "yolov8n" and hb["inferences"] == 42 and hb["sequence"] >= 2
        assert hb["outbox"]["depth"] >= 0 and hb["link"]["connected"] is True and hb["uptime_s"] >= 0
        assert json.loads(rec.on_topic("/status")[0])["state"] == "online"
        assert rec.wait_for(lambda m: any(t.endswith("/events") and b"fallback" in p for t, p in m), 10)
        n_ha = len(discovery_messages("homeassistant", "fleet", "dev", PREFIX))
        assert ha.wait_for(lambda m: len(m) >= n_ha, 10)
        cfg = json.loads(next(p for t, p in ha.snapshot() if t.startswith("homeassistant/sensor/")))
        assert cfg["availability"][0]["topic"] == PREFIX + "status"
        assert cfg["state_topic"] == PREFIX + "heartbeat"
        assert ha.retained == [] or all(
            t.startswith(("homeassistant/sensor/", "homeassistant/binary_sensor/")) for t, _ in ha.retained
        )
    finally:
        link.stop()
        ha.close()
    # Clean stop says so too; the recorder is another client, so its copy arrives after stop() returned.
    assert rec.wait_for(lambda m: _last_state(m) == "offline", 10)
    # Retained: a late subscriber sees offline and the discovery configs.
    late = Recorder(broker, "#", username="rec", password="recpw")
    try:
        assert late.wait_for(lambda m: len(m) >= n_ha + 1, 10)
        retained = dict(late.retained)
        assert json.loads(retained[PREFIX + "status"])["state"] == "offline"
        assert sum(t.startswith("homeassistant/") for t in retained) == n_ha
    finally:
        late.close()
        ob.close()


def test_outbox_drops_are_published_as_events(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ob = outbox(tmp_path, max_count=3)
    ob.put_many([b"{}"] * 10)  # 7 dropped before any link exists
    link = MqttLink(config=config(broker), fleet="fleet", device_id="dev", outbox=ob)
    link.start()
    try:
        assert rec.wait_for(lambda m: any(t.endswith("/events") and b"outbox_dropped" in p for t, p in m), 10)
        ev = json.loads(next(p for p in rec.on_topic("/events") if b"outbox_dropped" in p))
        assert ev["count"] == 7 and ev["reason"] == "routine"
    finally:
        link.stop()
        ob.close()


def test_inbound_strict_topic_size_limit_and_failing_handler(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker, inbound_max_bytes=64), fleet="fleet", device_id="dev", outbox=ob)
    got: list[bytes] = []

    def handler(data: bytes) -> None:
        if data == b"boom":
            raise ValueError("bad command")
        got.append(data)

    link.on_inbound("cmd", handler)
    with pytest.raises(ValueError, match="wildcards"):
        link.on_inbound("cmd/#", handler)
    assert link.start() is None
    try:
        time.sleep(0.3)
        pub = rec.client
        pub.publish(PREFIX + "cmd", b"boom", qos=1)  # handler raises: counted, link carries on
        pub.publish(PREFIX + "cmd", b"x" * 65, qos=1)  # too large
        pub.publish(PREFIX + "cmd/extra", b"nope", qos=1)  # not our topic (not subscribed)
        pub.publish(PREFIX + "cmd", b"hello", qos=1)
        deadline = time.monotonic() + 10
        while got != [b"hello"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [b"hello"]
        assert link.state.inbound_dropped == 2
        Results(rec).wait_all([ob.put(b"{}")])  # still delivering
        late: list[bytes] = []
        # Registered while connected: subscribed at once; it returns after the broker's SUBACK, so a message
        # published right after it is delivered (no sleep, no reconnect).
        connects = link.state.connects
        assert link.on_inbound("input", late.append) is True
        pub.publish(PREFIX + "input", b"frame", qos=1)
        assert wait_until(lambda: late == [b"frame"])
        assert link.state.connects == connects  # not through a reconnect
        assert link.loop_alive
    finally:
        link.stop()
        ob.close()
    assert not link.loop_alive


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_inbound_oversize_packet_is_never_buffered(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path, protocol: str
) -> None:
    """MQTT 5: CONNECT announces Maximum Packet Size, mosquitto drops the message for us and the connection
    stays. 3.1.1: the body is read in small chunks and thrown away, acknowledged, reported to the route's
    owner; the connection stays too, and the next message arrives."""
    broker, rec = gated
    ob = outbox(tmp_path)
    link = MqttLink(
        config=config(broker, protocol=protocol, inbound_max_bytes=1024),
        fleet="fleet", device_id="dev", outbox=ob,
    )
    got: list[bytes] = []
    drops: list[str] = []
    link.on_inbound("cmd", got.append, on_drop=drops.append)
    assert link.start() is None
    try:
        connects = link.state.connects
        assert wait_until(lambda: link.on_inbound("cmd", got.append, on_drop=drops.append))
        rec.client.publish(PREFIX + "cmd", b"\0" * (8 << 20), qos=1)
        rec.client.publish(PREFIX + "cmd", b"hello", qos=1)
        assert wait_until(lambda: got == [b"hello"])
        assert link.state.connects == connects and link.state.connected
        if protocol == "3.1.1":
            assert drops == [f"packet of {(8 << 20) + 2 + len(PREFIX + 'cmd') + 2} bytes exceeds the limit "
                             "of 1024 bytes"]
            assert link.state.inbound_dropped == 1
        else:
            assert drops == [] and link.state.inbound_dropped == 0  # never reached the device
    finally:
        link.stop()
        ob.close()


def test_a_paho_whose_reader_differs_is_refused_not_left_unguarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeguard.link import _bounded

    monkeypatch.setattr(_bounded, "_READER_KEYS", _bounded._READER_KEYS | {"a_key_paho_does_not_have"})
    ob = outbox(tmp_path)
    link = MqttLink(config=LinkConfig(port=1), fleet="fleet", device_id="dev", outbox=ob)
    try:
        with pytest.raises(LinkError, match=r"^link: paho-mqtt 2\.\d+\.\d+ reads packets differently"):
            link.start()
    finally:
        ob.close()


def test_inbound_oversize_discard_on_a_slow_line_keeps_the_connection(tmp_path: Path) -> None:
    """paho drops a connection whose PINGRESP does not come within the keepalive unless bytes keep arriving;
    the discarded body's bytes must count as arriving, as when paho reads a body itself. 12 s of trickle with
    keepalive_s = 5: without that, the link is dropped at ~10 s."""
    fake = SlowBroker()
    ob = outbox(tmp_path)
    cfg = LinkConfig(
        port=fake.port, protocol="3.1.1", keepalive_s=5, heartbeat_s=3600.0, inbound_max_bytes=1024,
        stop_timeout_s=0.0,  # the fake broker never acknowledges the offline status
    )
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    drops: list[str] = []
    link.on_inbound("cmd", lambda _b: None, on_drop=drops.append)
    topic = (PREFIX + "cmd").encode()
    server = threading.Thread(target=fake.serve, args=(topic, 256 * 1024, 12.0), daemon=True)
    server.start()
    assert link.start() is None
    try:
        server.join(30)
        assert wait_until(lambda: 4 in fake.kinds())  # PUBACK, for packet id 7
        assert [b for k, b in fake.packets if k == 4] == [(7).to_bytes(2, "big")]
        assert drops == [f"packet of {2 + len(topic) + 2 + 256 * 1024} bytes exceeds the limit of 1024 bytes"]
        assert 12 in fake.kinds()  # paho did ping during the body, and was answered after it
        assert link.state.connected and link.state.connects == 1 and link.state.attempts == 1
    finally:
        link.stop()
        ob.close()
        fake.server.close()


def test_inbound_oversize_discard_cut_by_a_reset_leaves_the_next_connection_intact(tmp_path: Path) -> None:
    """A connection reset in the middle of a discarded body: the next connection's packets are read as
    packets (its CONNACK is not thrown away as the rest of the old body)."""
    fake = SlowBroker()
    ob = outbox(tmp_path)
    cfg = LinkConfig(port=fake.port, protocol="3.1.1", heartbeat_s=3600.0, inbound_max_bytes=1024,
                     backoff_initial_s=0.05, backoff_max_s=0.2, stop_timeout_s=0.0)
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    link.on_inbound("cmd", lambda _b: None)
    server = threading.Thread(
        target=fake.serve, args=((PREFIX + "cmd").encode(), 256 * 1024, 2.0), kwargs={"reset_at": 0.5},
        daemon=True,
    )
    server.start()
    assert link.start() is None
    try:
        server.join(30)
        assert wait_until(lambda: link.state.connects == 2 and link.state.connected)
    finally:
        link.stop()
        ob.close()
        fake.server.close()


def test_mqtt_311_session(gated: tuple[MosquittoBroker, Recorder], tmp_path: Path) -> None:
    broker, rec = gated
    ob = outbox(tmp_path)
    link = MqttLink(config=config(broker, protocol="3.1.1"), fleet="fleet", device_id="dev", outbox=ob)
    assert link.start() is None
    try:
        assert link.state.protocol == "3.1.1"
        Results(rec).wait_all(ob.put_many([b"{}"] * 50))
    finally:
        link.stop()
        ob.close()


def test_keepalive_kept_while_idle_and_a_silent_broker_detected(
    broker_factory: Callable[..., MosquittoBroker], recorder_factory: Callable[..., Recorder], tmp_path: Path
) -> None:
    # The link thread runs paho's network loop itself: PINGREQs must go out while nothing else is sent
    # (mosquitto drops a client silent for 1.5 x keepalive), and a broker that stops answering (SIGSTOP: the
    # socket stays open) must be noticed by the keepalive and reconnected once it answers again.
    broker = broker_factory()
    # The recorder is silenced by the SIGSTOP too and reconnects in its own time, possibly after the link has
    # published: at QoS 0 the broker drops what it routes to a disconnected subscriber (that was this test's
    # flake, "1 acknowledged results never arrived"). At QoS 1 its persistent session, which survives a
    # stopped (not killed) broker, queues the result until the recorder is back.
    rec = recorder_factory(broker, "edgeguard/#", qos=1)
    ob = outbox(tmp_path)
    cfg = config(broker, username=None, password=None, keepalive_s=5, heartbeat_s=3600.0)
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    assert broker.proc is not None
    try:
        assert link.start() is None
        time.sleep(8.5)  # longer than 1.5 x keepalive, with no other traffic
        assert link.state.connected and link.state.connects == 1
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            assert wait_until(lambda: not link.state.connected, timeout=20.0)
            assert link.state.error_kind == "lost"
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: link.state.connected, timeout=20.0)
        Results(rec).wait_all([ob.put(b"{}")])
    finally:
        link.stop()
        ob.close()


def test_auto_falls_back_to_311_when_the_broker_refuses_5(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    with Mqtt311OnlyGate(broker.port) as gate:
        ob = outbox(tmp_path)
        link = MqttLink(config=config(broker, port=gate.port), fleet="fleet", device_id="dev", outbox=ob)
        assert link.config.protocol == "auto"
        try:
            assert link.start() is None
            assert link.wait_connected(10)
            assert link.state.protocol == "3.1.1"
            assert gate.refused_v5 == 1 and gate.passed == [4]  # one MQTT 5 refusal, then 3.1.1 (level 4)
            results = Results(rec)
            results.wait_all(ob.put_many([b'{"n":1}'] * 20))
            # A lost connection reconnects with 3.1.1 straight away: no second MQTT 5 attempt.
            connects = link.state.connects
            gate.drop_connections()
            assert wait_until(lambda: link.state.connects > connects and link.state.connected)
            assert gate.refused_v5 == 1 and gate.passed == [4, 4]
            results.wait_all(ob.put_many([b'{"n":2}'] * 20))
            assert json.loads(rec.on_topic("/status")[-1])["state"] == "online"
        finally:
            link.stop()
            ob.close()


# ------------------------------------------------------------------------------------------------- units
def test_backoff_is_exponential_jittered_and_capped() -> None:
    values = iter([0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0])
    b = Backoff(1.0, 8.0, rng=lambda: next(values))
    assert [b.next_delay() for _ in range(6)] == [0.5, 2.0, 3.0, 4.0, 8.0, 8.0]
    b.reset()
    assert b.next_delay() == 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("port", 0),
        ("protocol", "4"),
        ("keepalive_s", 1),
        ("inflight_window", 0),
        ("backoff_initial_s", 0.0),
        ("heartbeat_s", float("inf")),
        ("client_cert", Path("c.pem")),
        ("password", "x"),
        ("ha_prefix", "home/+/x"),
        ("host", ""),
    ],
)
def test_link_config_bounds(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"link.{key}"):
        LinkConfig(**{key: value})  # type: ignore[arg-type]


def test_bad_names_refused(tmp_path: Path) -> None:
    ob = outbox(tmp_path)
    with pytest.raises(ValueError, match="fleet"):
        MqttLink(config=LinkConfig(), fleet="a/b", device_id="dev", outbox=ob)
    with pytest.raises(ValueError, match="device_id"):
        MqttLink(config=LinkConfig(), fleet="f", device_id="#", outbox=ob)
    ob.close()


# ----------------------------------------------------------------------------------------- tls_server_name
def test_tls_server_name_right_name_connects_wrong_name_refused(
    broker_factory: Callable[..., MosquittoBroker],
    recorder_factory: Callable[..., Recorder],
    pki: Pki,
    tmp_path: Path,
) -> None:
    # The broker is reached by IP (127.0.0.1); its certificate also names "localhost". The name checked is
    # tls_server_name, not the address: a name the certificate does not carry is refused.
    broker = broker_factory(tls=pki, users=USERS)
    rec = recorder_factory(broker, "edgeguard/#", username="rec", password="recpw")
    ob = outbox(tmp_path)
    good = config(broker, ca_file=pki.ca_cert, tls_server_name="localhost")
    link = MqttLink(config=good, fleet="fleet", device_id="dev", outbox=ob)
    try:
        assert link.start() is None
        Results(rec).wait_all([ob.put(b'{"sni":true}')])
    finally:
        link.stop()
    bad = config(broker, ca_file=pki.ca_cert, tls_server_name="broker.example.net")
    link = MqttLink(config=bad, fleet="fleet", device_id="dev", outbox=ob)
    try:
        err = link.start()
        assert isinstance(err, LinkError), link.state
        assert link.state.error_kind == "tls"
        assert "broker.example.net" in str(err) and "tls_server_name" in str(err), err
        assert "\n" not in str(err)
    finally:
        link.stop()
        ob.close()


def test_tls_server_name_is_sent_as_sni(pki: Pki, tmp_path: Path) -> None:
    # A real TLS listener that records the server name each ClientHello carries.
    seen: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[assignment,misc]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # the CONNECT; never answered

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ob = outbox(tmp_path)
    cfg = LinkConfig(
        port=port, ca_file=pki.ca_cert, tls_server_name="localhost", connect_timeout_s=1.0, startup_wait_s=2.0
    )
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    try:
        link.start()
        assert wait_until(lambda: bool(seen), timeout=10.0)
        assert seen[0] == "localhost"
    finally:
        link.stop()
        listener.close()
        ob.close()
        t.join(5)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"tls_server_name": "broker.example.net"}, "needs ca_file"),
        ({"tls_server_name": "bad name", "ca_file": Path("ca.pem")}, "host name"),
        ({"tls_server_name": "", "ca_file": Path("ca.pem")}, "host name"),
    ],
)
def test_tls_server_name_bounds(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=f"link.tls_server_name: .*{why}"):
        LinkConfig(**kw)
