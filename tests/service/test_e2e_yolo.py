"""End to end: `edgeguard run` on a real sealed YOLOv8n with a real mosquitto; inputs through the local API,
the MQTT input topic and a watched directory; results and heartbeats observed on MQTT; kill -9 loses
nothing."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.service._env import ADMIN, INFER, STATUS, Device, yolo_bundle
from tests.support.broker import MosquittoBroker, Recorder


def _results(rec: Recorder) -> dict[str, dict]:
    out = {}
    for payload in rec.on_topic("/results"):
        doc = json.loads(payload)
        out[doc["id"]] = doc
    return out


def test_yolo_service_end_to_end(
    tmp_path: Path, yolov8n_path: Path, astronaut_png: Path, coffee_png: Path, text_png: Path
) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(b"", directory=True)
        (tmp_path / "model.egm").write_bytes(yolo_bundle(tmp_path, yolov8n_path))
        dev.start()
        try:
            dev.wait_ready()
            png = astronaut_png.read_bytes()
            # 1. Local API, image body: synchronous result, also published on MQTT under the same id.
            status, res = dev.request("POST", "/v1/infer?id=astro", png, ctype="image/png")
            assert status == 200, res
            assert res["post"]["kind"] == "detections" and res["model"] == {"name": "yolov8n", "version": 1}
            assert rec.wait_for(lambda m: res["id"] in _results(rec), 20)
            assert _results(rec)[res["id"]]["data"]["correlation_id"] == "astro"

            # 2. Access control and bad input: exact status and reason, the service keeps serving.
            assert dev.request("POST", "/v1/infer", png, token=None, ctype="image/png")[0] == 401
            assert dev.request("POST", "/v1/infer", png, token="x" * 24, ctype="image/png")[0] == 401
            assert dev.request("POST", "/v1/infer", png, token=STATUS, ctype="image/png")[0] == 403
            code, err = dev.request("POST", "/v1/infer", b"\x89PNG\r\n\x1a\n broken", ctype="image/png")
            assert code == 400 and err["error"]
            assert dev.request("POST", "/v1/infer", b"x" * (5 * 1024 * 1024), ctype="image/png")[0] == 413
            code, err = dev.request("POST", "/v1/infer", b'{"inputs": {"images": [[1, 2]]}}')
            assert code == 400 and "images" in err["error"]
            assert dev.request("GET", "/v1/health", token=STATUS)[0] == 200

            # 3. MQTT input topic (a gateway publishes a raw PNG) and a watched directory (a camera drops
            # files).
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway")
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            pub.publish("edgeguard/v1/test/dev-1/input", coffee_png.read_bytes(), qos=1).wait_for_publish(10)
            pub.publish("edgeguard/v1/test/dev-1/input", b"{not json", qos=1).wait_for_publish(10)
            incoming = tmp_path / "incoming"
            part = incoming / "frame-0001.png.part"
            part.write_bytes(text_png.read_bytes())
            os.replace(part, incoming / "frame-0001.png")
            assert rec.wait_for(
                lambda m: {"mqtt", "directory"} <= {r["data"]["source"] for r in _results(rec).values()}, 30
            )
            dev.wait(lambda: (incoming / "done" / "frame-0001.png").exists(), 10, "file moved to done/")
            assert rec.wait_for(lambda m: any(b"input-rejected" in p for p in rec.on_topic("/events")), 10)
            pub.loop_stop()
            pub.disconnect()

            # 4. Many concurrent clients.
            with ThreadPoolExecutor(max_workers=12) as pool:
                codes = list(
                    pool.map(
                        lambda i: dev.request("POST", f"/v1/infer?id=c{i}", png, ctype="image/png")[0],
                        range(36),
                    )
                )
            assert codes.count(200) + codes.count(503) == 36 and codes.count(200) >= 30

            # 5. Heartbeat: model, backend, supervisor figures, sources, security counters.
            assert rec.wait_for(
                lambda m: any(
                    json.loads(p).get("security", {}).get("api_forbidden", 0) >= 1
                    for p in rec.on_topic("/heartbeat")
                ),
                10,
            )
            hb = json.loads(rec.on_topic("/heartbeat")[-1])
            assert hb["state"] == "serving" and hb["model"]["name"] == "yolov8n"
            # On failure, say why the worker restarted (seen once on a machine at load ~8 on 2 cores; the
            # supervisor's recent failures name the cause, e.g. a hang or a stalled inference).
            assert hb["supervisor"]["restarts"] == 0, hb["supervisor"]
            assert "systemd" in hb["supervisor"]["watchdogs"]
            assert {"api", "mqtt", "directory"} <= set(hb["sources"])

            # 6. kill -9 the worker right after a burst of acknowledged results: all of them arrive anyway.
            acked = []
            for i in range(15):
                code, r = dev.request("POST", f"/v1/infer?id=burst{i}", png, ctype="image/png")
                assert code == 200
                acked.append(r["id"])
            old = dev.worker_pid()
            assert old is not None
            os.kill(old, signal.SIGKILL)
            dev.wait(lambda: dev.restarted(old), 60, "worker restarted")
            assert rec.wait_for(lambda m: set(acked) <= set(_results(rec)), 30), "acknowledged results lost"
            assert rec.wait_for(
                lambda m: any(b'"restart"' in p and b"signal 9" in p for p in rec.on_topic("/events")), 20
            )
            assert rec.wait_for(
                lambda m: any(
                    json.loads(p)["supervisor"]["restarts"] >= 1 for p in rec.on_topic("/heartbeat")
                ),
                10,
            )
            code, _ = dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)
            assert code == 200
            assert dev.request("POST", "/v1/infer", png, token=INFER, ctype="image/png")[0] == 200
        finally:
            rc = dev.stop()
        assert rc == 0
        assert any(n.startswith("STOPPING=1") for n in dev.notes)
        # The recorder is another client: its copy of the offline status may arrive after stop() returned.
        assert rec.wait_for(
            lambda m: [json.loads(p)["state"] for t, p in m if t.endswith("/status")][-1:] == ["offline"], 10
        )
