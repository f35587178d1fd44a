"""Untrusted bytes before allocation (issue 8, items 5-8), attacked on the real service.

Each test runs `edgeguard run` (supervisor + worker as child processes) against a real mosquitto, sends the
attack from a separate client (HTTP over a real socket, a paho publisher, a file in the watched directory) and
asserts the refusal: a one-line reason, the worker's memory growth bounded (its peak RSS, VmHWM after
resetting it through /proc/<pid>/clear_refs), no restart in the supervisor's record, and the service still
serving.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tests.service._env import INFER, STATUS, Device, seal, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
INPUT_TOPIC = "edgeguard/v1/test/dev-1/input"
MiB = 1024 * 1024
# link.inbound_max_bytes: the RSS bound of the MQTT attack is twice this; larger than the service tests' 1 MiB
# so that the worker's own background growth (heartbeats, outbox pages) cannot make the bound flaky.
INBOUND_MAX = 4 * MiB
# `|V1048576`: one item is 1 MiB, so a shape of a million elements (well under max_elements) claims 1 TiB.
VOID_NPY_HEADER = "{'descr': '|V1048576', 'fortran_order': False, 'shape': (1000000,), }"


def void_npy() -> bytes:
    header = VOID_NPY_HEADER.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64


# ---------------------------------------------------------------------------------------------- harness
def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """The worker's peak RSS growth over a block: VmHWM is reset to the current RSS at the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        self.base = _status(pid)["VmRSS"]

    def growth(self) -> int:
        return _status(self.pid)["VmHWM"] - self.base


class Svc:
    """A running service, its broker, and a recorder of everything it publishes."""

    def __init__(self, root: Path, bundle: bytes, *, link_extra: str = "", api_body: int = 4 * MiB,
                 directory: bool = False, api_extra: str = "", broker_persistence: bool = False) -> None:
        self.broker = MosquittoBroker(root, persistence=broker_persistence)
        self.rec = Recorder(self.broker, "edgeguard/v1/#")
        self.dev = Device(root=root, broker=self.broker)
        self.dev.provision(bundle, link_extra=link_extra, directory=directory, api_extra=api_extra)
        cfg = self.dev.config.read_text().replace("max_body_bytes = 4194304", f"max_body_bytes = {api_body}")
        cfg = cfg.replace("inbound_max_bytes = 1048576", f"inbound_max_bytes = {INBOUND_MAX}")
        self.dev.config.write_text(cfg)
        self.dev.start()
        self.dev.wait_ready()
        self.wait_heartbeat(lambda h: h["link"]["connected"])
        self.pid = self.worker_pid()

    def worker_pid(self) -> int:
        pid = self.dev.worker_pid()
        assert pid is not None
        return pid

    def close(self) -> None:
        try:
            self.dev.stop()
        finally:
            self.rec.close()
            self.broker.kill()

    def health(self) -> dict[str, Any]:
        code, doc = self.dev.request("GET", "/v1/health", token=STATUS)
        assert code in (200, 503), doc
        return dict(doc)

    def good(self) -> None:
        code, doc = self.dev.request("POST", "/v1/infer", GOOD)
        assert code == 200, doc
        assert np.allclose(doc["outputs"]["y"]["data"], [[0.2, 0.4, 0.6, 0.8]])

    def still_the_same_worker(self) -> None:
        health = self.health()
        assert health["pid"] == self.pid, f"the worker was restarted: {health['supervisor']}"
        assert health["supervisor"]["restarts"] == 0, health["supervisor"]
        assert health["state"] == "serving"

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in (json.loads(p) for p in self.rec.on_topic("/events")) if e.get("kind") == kind]

    def wait_event(self, kind: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> None:
        assert self.rec.wait_for(lambda _m: any(pred(e) for e in self.events(kind)), timeout), (
            f"no {kind} event; seen: {self.events(kind)[-3:]}"
        )

    def heartbeats(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.rec.on_topic("/heartbeat")]

    def wait_heartbeat(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        assert self.rec.wait_for(lambda _m: any(pred(h) for h in self.heartbeats()), timeout), (
            f"no such heartbeat; last: {self.heartbeats()[-1:]}"
        )
        return [h for h in self.heartbeats() if pred(h)][-1]


def publish(broker: MosquittoBroker, payload: bytes, *, topic: str = INPUT_TOPIC, qos: int = 1,
            protocol: int = mqtt.MQTTv311) -> None:
    """Publish from a separate client (the attacker) and wait for the broker's PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{time.monotonic_ns()}",
                         protocol=protocol)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(60)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Svc]:
    root = tmp_path_factory.mktemp("inbound")
    s = Svc(root, tiny_bundle(root), directory=True)
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------------- 8. .npy before allocation
def test_void_npy_on_the_api_is_a_400_not_a_memory_error(svc: Svc) -> None:
    code, doc = svc.dev.request("POST", "/v1/infer", void_npy(), ctype="application/x-npy")
    assert code == 400, doc
    assert "numeric" in doc["error"] and "\n" not in doc["error"]
    svc.good()
    svc.still_the_same_worker()
    assert "MemoryError" not in svc.dev.log_tail()


def test_void_npy_on_mqtt_input_is_rejected_with_an_event(svc: Svc) -> None:
    publish(svc.broker, void_npy())
    svc.wait_event("input-rejected", lambda e: "numeric" in str(e.get("reason")))
    svc.good()
    svc.still_the_same_worker()
    assert "MemoryError" not in svc.dev.log_tail()


def test_void_npy_in_the_watched_directory_fails_that_file_only(svc: Svc) -> None:
    incoming = svc.dev.root / "incoming"
    (incoming / "bomb.npy").write_bytes(void_npy())
    reason = incoming / "failed" / "bomb.npy.error.txt"
    svc.dev.wait(reason.exists, 20, "bomb.npy moved to failed/")
    assert "numeric" in reason.read_text()
    buf = io.BytesIO()
    np.save(buf, np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    (incoming / "after.npy").write_bytes(buf.getvalue())
    svc.dev.wait((incoming / "done" / "after.npy").exists, 20, "a later file still processed")
    svc.still_the_same_worker()
    assert "MemoryError" not in svc.dev.log_tail()


# ------------------------------------------------------------------------------------ 5. MQTT inbound size
BIG = 200 * MiB


def _mqtt_results(s: Svc) -> int:
    return sum(1 for p in s.rec.on_topic("/results") if json.loads(p)["data"].get("source") == "mqtt")


def _flood_and_check(s: Svc, protocol: int) -> Peak:
    """200 MiB on the input topic from a separate publisher, then a good message: the good one is answered
    (so the big one, before it in the broker's order, has been dealt with), memory stayed bounded."""
    # Warm up first: the first message and the first refusal import and allocate what every later one reuses;
    # the attack is measured against that steady state.
    before = _mqtt_results(s)
    publish(s.broker, b"{not json", protocol=protocol)
    publish(s.broker, GOOD, protocol=protocol)
    assert s.rec.wait_for(lambda _m: _mqtt_results(s) > before, 60), "a good message before the flood"
    before = _mqtt_results(s)
    peak = Peak(s.pid)
    publish(s.broker, b"\0" * BIG, protocol=protocol)
    publish(s.broker, GOOD, protocol=protocol)
    assert s.rec.wait_for(lambda _m: _mqtt_results(s) > before, 60), "a good message after the flood"
    growth = peak.growth()
    assert growth < 2 * INBOUND_MAX, f"worker peak RSS grew by {growth / MiB:.1f} MiB"
    s.still_the_same_worker()
    s.good()
    return peak


def test_200_mib_publish_mqtt5_is_refused_by_the_broker_via_maximum_packet_size(svc: Svc) -> None:
    connects = svc.health()["link"]["connects"]
    _flood_and_check(svc, mqtt.MQTTv5)
    link = svc.health()["link"]
    assert link["protocol"] == "5" and link["connected"] and link["connects"] == connects  # never dropped


def test_200_mib_publish_mqtt311_is_read_and_discarded_with_an_event(tmp_path: Path) -> None:
    # A persistent broker: its sessions, and any message not acknowledged to the device, survive its restart.
    s = Svc(tmp_path, tiny_bundle(tmp_path), link_extra='protocol = "3.1.1"\n', broker_persistence=True)
    try:
        _flood_and_check(s, mqtt.MQTTv311)
        s.wait_event("input-rejected", lambda e: f"packet of {BIG + 2 + len(INPUT_TOPIC) + 2}" in e["reason"])
        link = s.health()["link"]
        assert link["protocol"] == "3.1.1" and link["connected"] and link["inbound_dropped"] == 1
        # Acknowledged when discarded: the broker does not send it again on the next connection.
        s.broker.restart(kill=False)
        s.wait_heartbeat(lambda h: h["link"]["connects"] >= 2)
        before = _mqtt_results(s)
        publish(s.broker, GOOD)  # after whatever the broker resends on the new connection
        assert s.rec.wait_for(lambda _m: _mqtt_results(s) > before, 60)
        assert len([e for e in s.events("input-rejected") if "packet of" in e["reason"]]) == 1
    finally:
        s.close()


# ----------------------------------------------------------------------- 6. one infer client vs. liveness
FLOOD = 32
FLOOD_BODY = 15 * MiB
BYTES_IN_FLIGHT = 48 * MiB  # sources.api.max_bytes_in_flight for this service: three 15 MiB bodies


def _flood_body() -> bytes:
    # ~3 million numbers: as JSON -> Python floats -> numpy, each costs several times its bytes to parse.
    head, tail = b'{"inputs": {"x": [', b"0.5]}}"
    return head + b"0.5, " * ((FLOOD_BODY - len(head) - len(tail)) // 5) + tail


def _post(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/infer", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {INFER}"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert "\n" not in doc["error"]
        return resp.status
    finally:
        conn.close()


def test_flood_of_big_json_bodies_keeps_liveness_memory_bounded_excess_503(tmp_path: Path) -> None:
    s = Svc(tmp_path, tiny_bundle(tmp_path), api_body=16 * MiB,
            api_extra=f"max_bytes_in_flight = {BYTES_IN_FLIGHT}\n")
    try:
        body = _flood_body()
        assert _post(s.dev.port, body) == 400  # warm up: one such body alone is parsed and refused
        peak = Peak(s.pid)
        with concurrent.futures.ThreadPoolExecutor(FLOOD) as pool:
            codes = list(pool.map(lambda _i: _post(s.dev.port, body), range(FLOOD)))
        growth = peak.growth()
        assert set(codes) <= {400, 503}, codes
        assert codes.count(503) >= 1 and codes.count(400) >= 1, codes
        s.still_the_same_worker()  # liveness never starved: no hang restart, no safe state
        # The bodies admitted at once, twice while aiohttp joins their chunks (2 x 48 MiB), plus one parse's
        # working set (parse_threads = 1): a JSON body of numbers is about 11 times its size as Python floats,
        # their list and the array (measured: 150..170 MiB for one 15 MiB body alone, the same for the flood).
        bound = 2 * BYTES_IN_FLIGHT + 12 * FLOOD_BODY
        assert growth < bound, f"worker peak RSS grew by {growth / MiB:.0f} MiB"
        s.good()
    finally:
        s.close()


# --------------------------------------------------------------------------- 7. image decompression bombs
def image_onnx() -> bytes:
    """y = images x 1 for images float32 [1, 3, 32, 32]: a model that takes camera images through the
    preprocessor, small enough that any big image is out of proportion to it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Mul", ["images", "k"], ["y"])], "img", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


IMAGE_META: dict[str, Any] = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 32, 32], "range": [0.0, 1.0]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3, 32, 32]}],
    "preprocess": {"size": [32, 32], "layout": "NCHW", "resize": "letterbox"},
}


def bomb_png(width: int, height: int, *, color_type: int, bit_depth: int = 8) -> bytes:
    """A real, complete PNG of zeros: a few KiB that decode to width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    channels = {0: 1, 2: 3, 3: 1}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)  # filter byte 0, then the samples
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    plte = chunk(b"PLTE", b"\0\0\0" * 256) if color_type == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def ordinary_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Svc]:
    root = tmp_path_factory.mktemp("images")
    golden = np.random.default_rng(0).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    bundle = seal(root, image_onnx(), name="camera", version=1, meta=IMAGE_META, golden_in={"images": golden})
    s = Svc(root, bundle)
    try:
        code, doc = s.dev.request("POST", "/v1/infer", ordinary_png(), ctype="image/png")  # warm up
        assert code == 200, doc
        yield s
    finally:
        s.close()


BOMBS = {
    "grey-8bit-6000x6000": (6000, 6000, 0, 8),  # 36 Mpx, under the old 40 Mpx limit: +300 MiB decoded
    "grey-16bit-4000x4000": (4000, 4000, 0, 16),
    "palette-6000x6000": (6000, 6000, 3, 8),
    "rgb-5000x5000": (5000, 5000, 2, 8),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bomb_png_is_a_400_before_decoding(image_svc: Svc, name: str) -> None:
    width, height, color_type, depth = BOMBS[name]
    data = bomb_png(width, height, color_type=color_type, bit_depth=depth)
    assert len(data) < 200 * 1024
    peak = Peak(image_svc.pid)
    code, doc = image_svc.dev.request("POST", "/v1/infer", data, ctype="image/png")
    growth = peak.growth()
    assert code == 400, doc
    assert doc["error"].startswith(f"image: {width}x{height} pixels") and "decoded" in doc["error"], doc
    assert growth < 16 * MiB, f"worker peak RSS grew by {growth / MiB:.0f} MiB"
    code, doc = image_svc.dev.request("POST", "/v1/infer", ordinary_png(), ctype="image/png")
    assert code == 200, doc
    image_svc.still_the_same_worker()


def test_decompression_bomb_on_mqtt_input_is_rejected_with_an_event(image_svc: Svc) -> None:
    data = bomb_png(6000, 6000, color_type=0)  # 35 KiB: well within the MQTT input limit
    peak = Peak(image_svc.pid)
    publish(image_svc.broker, data)
    image_svc.wait_event("input-rejected", lambda e: "6000x6000 pixels (L)" in e["reason"])
    growth = peak.growth()
    assert growth < 16 * MiB, f"worker peak RSS grew by {growth / MiB:.0f} MiB"
    code, doc = image_svc.dev.request("POST", "/v1/infer", ordinary_png(), ctype="image/png")
    assert code == 200, doc
    image_svc.still_the_same_worker()
