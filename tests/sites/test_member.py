"""GroupMember against a real mosquitto with the pipeline replaced by a sink of our own (the InferenceSink
seam): backpressure (leave the share when the queue is deep, rejoin when drained), an input that cannot be
served now is kept and served later, every input is served exactly once, bad input is answered and counted.
A broker that speaks MQTT 3.1.1 only is refused with the one-line reason."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import ConfigError, ServiceUnavailable
from edgeguard.link._config import LinkConfig
from edgeguard.service.config import parse_config
from edgeguard.sites import NOT_MQTT5, GroupClient, GroupMember, SiteConfig
from edgeguard.sources import BodyLimits, InferenceRequest
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

SPEC = TensorSpec(name="x", dtype="float32", shape=(1, 4), value_range=(0.0, 1.0))


class Sink:
    """Records what it served; ``gate`` holds every call; ``unavailable`` raises like an unloaded model."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.unavailable = False
        self.served: list[InferenceRequest] = []
        self.lock = threading.Lock()

    def __call__(self, request: InferenceRequest) -> dict[str, Any]:
        self.gate.wait(60)
        if self.unavailable:
            raise ServiceUnavailable("not serving: no model")
        with self.lock:
            self.served.append(request)
        return {"id": str(len(self.served))}


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _member(port: int, sink: Sink, unable: Any = lambda: "", device: str = "d1", **site: Any) -> GroupMember:
    cfg = SiteConfig(
        enabled=True,
        group="g1",
        keepalive_s=5,
        check_s=0.05,
        queue_size=8,
        leave_at=4,
        rejoin_at=1,
        receive_maximum=4,
        **site,
    )
    return GroupMember(
        config=cfg,
        link=LinkConfig(host="127.0.0.1", port=port),
        fleet="f",
        device_id=device,
        sink=sink,
        specs=lambda: [SPEC],
        limits=BodyLimits(),
        unable=unable,
    )


def _body(i: int) -> bytes:
    return json.dumps({"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}, "id": f"body-{i}"}).encode()


def test_deep_queue_leaves_the_share_and_every_input_is_served_once(tmp_path: Path) -> None:
    sink = Sink()
    with MosquittoBroker(tmp_path) as broker:
        m = _member(broker.port, sink)
        m.start()
        try:
            _wait(lambda: m.snapshot()["share"] == "joined", scaled(20), "joined")
            sink.gate.clear()  # the engine stalls: inputs pile up
            with GroupClient(host="127.0.0.1", port=broker.port, fleet="f", group="g1") as client:
                for i in range(6):
                    client.send(f"c-{i}", _body(i))
                _wait(lambda: m.snapshot()["share"] == "left", scaled(20), "left at leave_at")
                snap = m.snapshot()
                assert snap["reason"].startswith("queue full"), snap
                assert snap["leaves"] == 1
                sink.gate.set()
                _wait(lambda: len(sink.served) == 6, scaled(20), "all six served")
                _wait(lambda: m.snapshot()["share"] == "joined", scaled(20), "rejoined")
            ids = sorted(r.correlation_id or "" for r in sink.served)
            assert ids == [f"c-{i}" for i in range(6)]  # the MQTT 5 correlation data wins over the body's id
            notes = sink.served[0].annotations or {}
            assert notes["served_by"] == "d1" and notes["attempt"] == 1 and notes["redelivered"] is False
        finally:
            m.stop(5)


def test_input_taken_while_the_model_goes_away_is_kept_and_served_later(tmp_path: Path) -> None:
    sink = Sink()
    reason = {"now": ""}
    with MosquittoBroker(tmp_path) as broker:
        m = _member(broker.port, sink, unable=lambda: reason["now"])
        m.start()
        try:
            _wait(lambda: m.snapshot()["share"] == "joined", scaled(20), "joined")
            sink.unavailable = True  # the model goes away between taking the input and serving it
            with GroupClient(host="127.0.0.1", port=broker.port, fleet="f", group="g1") as client:
                client.send("late", _body(0))
                _wait(lambda: m.snapshot()["requeued"] >= 1, scaled(20), "requeued")
                reason["now"] = "no model: not serving"
                _wait(lambda: m.snapshot()["share"] == "left", scaled(20), "left: no model")
                assert not sink.served
                sink.unavailable, reason["now"] = False, ""
                _wait(lambda: len(sink.served) == 1, scaled(20), "served after the model is back")
        finally:
            m.stop(5)


def test_bad_input_is_answered_with_a_reason_and_the_member_keeps_serving(tmp_path: Path) -> None:
    sink = Sink()
    events: list[tuple[str, dict[str, Any]]] = []
    with MosquittoBroker(tmp_path) as broker:
        m = _member(broker.port, sink)
        m._on_event = lambda kind, data: events.append((kind, data))
        m.start()
        try:
            _wait(lambda: m.snapshot()["share"] == "joined", scaled(20), "joined")
            with GroupClient(host="127.0.0.1", port=broker.port, fleet="f", group="g1") as client:
                client.send("bad", b'{"inputs": ')
                client.send("good", _body(1))
                _wait(lambda: len(sink.served) == 1 and m.snapshot()["rejected"] == 1, scaled(20), "both")
            rejected = [d for k, d in events if k == "input-rejected"]
            assert rejected and rejected[0]["correlation_id"] == "bad" and "\n" not in rejected[0]["reason"]
        finally:
            m.stop(5)


def _fake_311_broker() -> tuple[socket.socket, threading.Thread]:
    """Answers any CONNECT as an MQTT 3.1.1-only broker does: CONNACK 'unacceptable protocol version'."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.sendall(b"\x20\x02\x00\x01")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_mqtt_311_only_broker_is_refused_with_a_clear_reason() -> None:
    srv, _ = _fake_311_broker()
    m = _member(srv.getsockname()[1], Sink())
    m.start()
    try:
        _wait(lambda: m.dead, scaled(20), "refusal")
        assert m.error == NOT_MQTT5 and m.snapshot()["share"] == "left"
    finally:
        m.stop(1)
        srv.close()


def test_site_needs_mqtt5_in_the_config(tmp_path: Path) -> None:
    doc = {
        "device": {"id": "d1", "state_dir": "s"},
        "model": {"bundle": "m.egm", "trust": ["p.pub"], "device_key": "k"},
        "link": {"protocol": "3.1.1"},
        "site": {"enabled": True, "group": "g1"},
    }
    with pytest.raises(ConfigError, match="MQTT 5"):
        parse_config(doc, path=tmp_path / "c.toml")


@pytest.mark.parametrize(
    ("site", "why"),
    [
        ({"enabled": True, "group": "a/b"}, "site.group"),
        ({"enabled": True, "group": "g", "leave_at": 40, "queue_size": 32}, "site.leave_at"),
        ({"enabled": True, "group": "g", "rejoin_at": 30}, "site.rejoin_at"),
        ({"enabled": True, "group": "g", "keepalive_s": 1}, "site.keepalive_s"),
        ({"enabled": True, "group": "g", "streams": [{"name": "c", "primary": "a"}]}, "standby"),
        ({"enabled": True, "group": "g", "streams": "x"}, "site.streams"),
        ({"enabled": True, "group": "g", "bogus": 1}, "unknown key"),
    ],
)
def test_bad_site_config_is_one_line(tmp_path: Path, site: dict, why: str) -> None:
    doc = {
        "device": {"id": "d1", "state_dir": "s"},
        "model": {"bundle": "m.egm", "trust": ["p.pub"], "device_key": "k"},
        "site": site,
    }
    with pytest.raises(ConfigError, match=why) as info:
        parse_config(doc, path=tmp_path / "c.toml")
    assert "\n" not in str(info.value)


def test_a_stalled_member_leaves_and_every_input_is_served_exactly_once(
    tmp_path: Path,
) -> None:
    slow, fast = Sink(), Sink()
    with MosquittoBroker(tmp_path) as broker:
        cfg = {
            "keepalive_s": 5,
            "check_s": 0.05,
            "queue_size": 2,
            "leave_at": 1,
            "rejoin_at": 0,
            "receive_maximum": 100,
        }
        m1 = GroupMember(
            config=SiteConfig(enabled=True, group="g1", **cfg),
            link=LinkConfig(host="127.0.0.1", port=broker.port),
            fleet="f",
            device_id="d1",
            sink=slow,
            specs=lambda: [SPEC],
            limits=BodyLimits(),
            unable=lambda: "",
        )
        m2 = _member(broker.port, fast, device="d2")
        for m in (m1, m2):
            m.start()
        try:
            _wait(lambda: m1.snapshot()["share"] == m2.snapshot()["share"] == "joined", scaled(20), "joined")
            slow.gate.clear()  # d1 takes inputs and cannot finish them
            with GroupClient(host="127.0.0.1", port=broker.port, fleet="f", group="g1") as client:
                for i in range(40):
                    client.send(f"c-{i}", _body(i))
                _wait(lambda: m1.snapshot()["share"] == "left", scaled(30), "d1 left")
                slow.gate.set()
                _wait(lambda: len(fast.served) + len(slow.served) == 40, scaled(30), "all served")
            ids = sorted(r.correlation_id or "" for r in fast.served + slow.served)
            assert ids == sorted(f"c-{i}" for i in range(40))  # none lost, none twice
            snap = m1.snapshot()
            assert snap["served"] == snap["received"] == len(slow.served) and snap["overrun"] >= 0
            print(f"\nd1 received {snap['received']}, overrun {snap['overrun']}, served {snap['served']}")
        finally:
            for m in (m1, m2):
                m.stop(5)
