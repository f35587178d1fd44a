"""protocol = "auto" against brokers that do not answer an MQTT 5 CONNECT (RabbitMQ's MQTT plugin before
3.13 closes the connection without a CONNACK; tests/brokers runs the real one): a real mosquitto behind a
real TCP gate that behaves so."""

from __future__ import annotations

import json
from pathlib import Path

from edgeguard.link import MqttLink
from tests.link._mqtt311_gate import Mqtt311OnlyGate
from tests.link.test_link import Results, config, gated, outbox, wait_until
from tests.support.broker import MosquittoBroker, Recorder

__all__ = ["gated"]


def test_auto_falls_back_to_311_when_the_broker_closes_5_unanswered(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, rec = gated
    with Mqtt311OnlyGate(broker.port, silent=True) as gate:
        ob = outbox(tmp_path)
        link = MqttLink(config=config(broker, port=gate.port), fleet="fleet", device_id="dev", outbox=ob)
        try:
            link.start()
            assert link.wait_connected(20)
            assert link.state.protocol == "3.1.1"
            assert gate.levels == [5, 5, 4]  # two closes unanswered, then 3.1.1 (level 4) at once
            Results(rec).wait_all(ob.put_many([b'{"n":1}'] * 10))
            # it stays on 3.1.1 across a lost connection, as after a refusal
            gate.drop_connections()
            assert wait_until(lambda: link.state.connects == 2 and link.state.connected, 20)
            assert gate.levels == [5, 5, 4, 4]
            # The birth goes out after CONNACK and reaches the recorder after the will of the lost connection.
            assert wait_until(lambda: json.loads(rec.on_topic("/status")[-1])["state"] == "online", 20)
        finally:
            link.stop()
            ob.close()


def test_a_broker_closing_every_connect_keeps_mqtt_5_and_says_why(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, _rec = gated
    with Mqtt311OnlyGate(broker.port, close_all=True) as gate:
        ob = outbox(tmp_path)
        link = MqttLink(config=config(broker, port=gate.port), fleet="fleet", device_id="dev", outbox=ob)
        try:
            link.start()
            assert wait_until(lambda: len(gate.levels) >= 7, 30), gate.levels
            # 5, 5, then one 3.1.1 try, closed as well: the broker is unwell, not 3.1.1-only: back to 5
            assert gate.levels[:6] == [5, 5, 4, 5, 5, 4], gate.levels
            assert not link.state.connected
            assert link.state.error is not None and "before CONNACK" in link.state.error
        finally:
            link.stop()
            ob.close()


def test_explicit_protocol_5_never_falls_back(
    gated: tuple[MosquittoBroker, Recorder], tmp_path: Path
) -> None:
    broker, _rec = gated
    with Mqtt311OnlyGate(broker.port, silent=True) as gate:
        ob = outbox(tmp_path)
        link = MqttLink(config=config(broker, port=gate.port, protocol="5"), fleet="fleet", device_id="dev",
                        outbox=ob)
        try:
            link.start()
            assert wait_until(lambda: len(gate.levels) >= 4, 30)
            assert set(gate.levels) == {5} and not link.state.connected
        finally:
            link.stop()
            ob.close()
