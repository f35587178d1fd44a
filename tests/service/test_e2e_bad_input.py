"""Bad input and outages at the service level: `edgeguard run` (supervisor + worker as child processes) on a
small sealed sensor model, a real mosquitto, the local API over real sockets.

Every case checks three things: the one-line reason, that the service still serves afterwards (a good request
succeeds), and that nothing acknowledged was lost (every id answered with a 200 arrives on MQTT `results`, in
order; duplicates only of ids already seen). One service is shared by the cases where that is natural: it is
started while its broker is down (the broker-down case reads what was observed then). The full-disk cases run
their own service on a small tmpfs mounted as state_dir (skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tests.service._env import INFER, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

USERS = {"dev": "devpw", "rec": "recpw"}
REC_ONLY = {"rec": "recpw"}  # the broker admits only the recorder until it is subscribed
LINK_AUTH = 'username = "dev"\npassword = "devpw"\n'
MAX_ELEMENTS = 64
MAX_BODY = 4194304  # sources.api.max_body_bytes in tests/service/_env.py
GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
INPUT_TOPIC = "edgeguard/v1/test/dev-1/input"


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def f32(*values: float) -> np.ndarray:
    return np.array([values], np.float32)


class Delivery:
    """Parses the recorder's `results` incrementally: first sightings must come in seq order; a repeat is
    allowed only for an id already seen (at-least-once across broker restarts)."""

    def __init__(self, rec: Recorder, device: str = "dev-1") -> None:
        self.rec = rec
        self.device = device
        self.index = 0
        self.order: list[int] = []
        self.seen: set[str] = set()
        self.docs: dict[str, dict[str, Any]] = {}
        self.duplicates = 0

    def update(self) -> None:
        msgs = self.rec.snapshot()
        for topic, payload in msgs[self.index :]:
            if not topic.endswith("/results"):
                continue
            body = json.loads(payload)
            if body["id"] in self.seen:
                self.duplicates += 1
                continue
            assert body["id"] == f"{self.device}:{body['seq']}", body["id"]
            assert not self.order or body["seq"] > self.order[-1], (
                f"out of order: seq {body['seq']} after {self.order[-1]}"
            )
            self.seen.add(body["id"])
            self.order.append(body["seq"])
            self.docs[body["id"]] = body
        self.index = len(msgs)

    def wait_all(self, ids: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.update()
            missing = [i for i in ids if i not in self.seen]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} acknowledged results never arrived, e.g. {missing[:5]}")
            time.sleep(0.05)


class Harness:
    """A running service, its (gated) broker and recorder, and every id the API acknowledged."""

    def __init__(self, dev: Device, broker: MosquittoBroker) -> None:
        self.dev = dev
        self.broker = broker
        self.rec: Recorder | None = None
        self.delivery: Delivery | None = None
        self.acked: list[str] = []
        self._lock = threading.Lock()
        self.down: dict[str, Any] = {}  # what was seen while the broker was down at start
        self.link_ups = 0  # broker starts the device was admitted to

    # -- broker --------------------------------------------------------------------------------------------
    def broker_up(self, *, wait_device: bool = True) -> None:
        """Start the broker admitting only the recorder; the device gets in once the recorder listens (a
        kill -9 leaves the broker with no session state, so results sent before would reach nobody). Then
        wait for the device's first heartbeat on the new connection: it is sent after the SUBSCRIBE to the
        input topic on the same socket, so input published from then on reaches the device."""
        subscribed = self.rec.subscribed if self.rec is not None else 0
        self.broker.start(users=REC_ONLY)
        if self.rec is None:
            self.rec = Recorder(self.broker, "edgeguard/v1/#", username="rec", password="recpw")
            self.delivery = Delivery(self.rec)
        else:
            self.rec.wait_subscribed(subscribed + 1)
        self.broker.set_users(USERS)
        self.link_ups += 1
        if wait_device:
            self.wait_heartbeat(lambda h: h["link"]["connects"] >= self.link_ups, 20)

    def broker_kill(self) -> None:
        self.broker.kill()

    # -- requests ------------------------------------------------------------------------------------------
    def post(self, body: bytes, ctype: str = "application/json", path: str = "/v1/infer") -> tuple[int, Any]:
        # The id is recorded under the lock in answer order; with one client thread that is seq order.
        code, doc = self.dev.request("POST", path, body, ctype=ctype)
        if code == 200:
            with self._lock:
                self.acked.append(doc["id"])
        return code, doc

    def good(self) -> str:
        code, doc = self.post(GOOD)
        assert code == 200, doc
        assert np.allclose(doc["outputs"]["y"]["data"], [[0.2, 0.4, 0.6, 0.8]])
        return str(doc["id"])

    def health(self) -> dict[str, Any]:
        code, doc = self.dev.request("GET", "/v1/health", token=STATUS)
        assert code in (200, 503), doc
        return dict(doc)

    # -- MQTT side ----------------------------------------------------------------------------------------
    def all_delivered(self, timeout: float = 30.0) -> None:
        assert self.delivery is not None
        with self._lock:
            ids = list(self.acked)
        self.delivery.wait_all(ids, timeout)

    def wait_result(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        delivery = self.delivery
        assert delivery is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivery.update()
            found = [d for d in delivery.docs.values() if pred(d)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError("no such result on MQTT `results`")

    def heartbeats(self) -> list[dict[str, Any]]:
        assert self.rec is not None
        return [json.loads(p) for p in self.rec.on_topic("/heartbeat")]

    def events(self) -> list[dict[str, Any]]:
        assert self.rec is not None
        return [json.loads(p) for p in self.rec.on_topic("/events")]

    def wait_heartbeat(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        assert self.rec is not None
        found: list[dict[str, Any]] = []

        def check(_m: object) -> bool:
            found[:] = [h for h in self.heartbeats() if pred(h)]
            return bool(found)

        assert self.rec.wait_for(check, timeout), f"no such heartbeat; last: {self.heartbeats()[-1:]}"
        return found[-1]

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        assert self.rec is not None
        assert self.rec.wait_for(lambda m: any(pred(e) for e in self.events()), timeout), (
            f"no such event; seen: {[e.get('kind') for e in self.events()]}"
        )
        return next(e for e in self.events() if pred(e))

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()


def start_service(root: Path, **provision: Any) -> tuple[Device, MosquittoBroker]:
    broker = MosquittoBroker(root, users=USERS, start=False)
    dev = Device(root=root, broker=broker)
    dev.provision(tiny_bundle(root), link_extra=LINK_AUTH, **provision)
    return dev, broker


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("svc")
    dev, broker = start_service(root, api_extra=f"max_elements = {MAX_ELEMENTS}\n")
    h = Harness(dev, broker)
    dev.start()  # the broker is down: the service must become READY anyway
    try:
        dev.wait_ready()
        h.down["codes"] = [h.post(GOOD)[0] for _ in range(5)]
        h.down["ids"] = list(h.acked)
        h.down["health"] = h.health()
        h.down["notes"] = list(dev.notifications())
        h.down["log"] = dev.log_tail()
        h.broker_up()
        yield h
    finally:
        dev.stop()
        h.close()
        broker.kill()


# ------------------------------------------------------------------------------------------ 2. broker down
def test_broker_down_at_start_serves_then_delivers_everything(svc: Harness) -> None:
    down = svc.down
    assert down["codes"] == [200] * 5 and len(set(down["ids"])) == 5
    status = [n for n in down["notes"] if "STATUS=" in n and "serving" in n]
    assert status and "link down" in status[0], down["notes"]  # what `systemctl status` showed
    # The reason, one line, in the journal.
    assert any("MQTT link:" in line and "refused" in line for line in down["log"].splitlines()), down["log"]
    assert down["health"]["state"] == "serving" and down["health"]["ok"] is True  # offline is not unhealthy
    svc.all_delivered()
    hb = svc.wait_heartbeat(lambda h: h["link"]["connected"] and h["link"]["connects"] >= 1)
    assert hb["outbox"]["alarm"] is None
    svc.good()
    svc.all_delivered()


def test_health_shows_link_down_with_its_reason(svc: Harness) -> None:
    health = svc.down["health"]
    assert "link" in health, sorted(health)
    assert health["link"]["connected"] is False and "refused" in str(health["link"]["error"])


# -------------------------------------------------------------------------------------- 1. bad tensors
def _chunked_post(dev: Device, size: int) -> tuple[int, Any]:
    """An upload without Content-Length (chunked): the limit must hold while reading, too."""
    conn = http.client.HTTPConnection("127.0.0.1", dev.port, timeout=30)

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent < size:
            piece = b"0" * min(65536, size - sent)
            sent += len(piece)
            yield piece

    try:
        conn.request(
            "POST",
            "/v1/infer",
            body=chunks(),
            headers={"Authorization": f"Bearer {INFER}", "Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


nan = float("nan")
inf = float("inf")
# fmt: off
BAD: list[tuple[str, bytes, str, int, str, str | None]] = [
    # (case, body, content type, status, words of the reason, guard check that counts it)
    ("json NaN", b'{"inputs": {"x": [[0.1, NaN, 0.3, 0.4]]}}', "application/json", 400,
     "input 'x': 1 NaN and 0 Inf values (first at index (0, 1))", "finite"),
    ("json Inf", b'{"inputs": {"x": [[0.1, Infinity, -Infinity, 0.4]]}}', "application/json", 400,
     "input 'x': 0 NaN and 2 Inf values (first at index (0, 1))", "finite"),
    ("npy NaN", npy(f32(nan, 0.1, 0.2, 0.3)), "application/x-npy", 400,
     "input 'x': 1 NaN and 0 Inf values (first at index (0, 0))", "finite"),
    ("npy Inf", npy(f32(0.1, 0.2, 0.3, inf)), "application/x-npy", 400,
     "input 'x': 0 NaN and 1 Inf values (first at index (0, 3))", "finite"),
    ("npy float64", npy(np.array([[0.1, 0.2, 0.3, 0.4]])), "application/x-npy", 400,
     "input 'x': dtype float64 does not match float32", "dtype"),
    ("json dtype", b'{"inputs": {"x": {"data": [1, 2, 3, 4], "shape": [1, 4], "dtype": "int32"}}}',
     "application/json", 400, "input 'x': dtype 'int32' given, the model takes float32", None),
    ("json shape", b'{"inputs": {"x": [[0.1, 0.2]]}}', "application/json", 400,
     "input 'x': shape (1, 2) does not match [1, 4]", "shape"),
    ("npy shape", npy(np.array([0.1, 0.2, 0.3, 0.4], np.float32)), "application/x-npy", 400,
     "input 'x': shape (4,) does not match [1, 4]", "shape"),
    ("npy elements", npy(np.zeros((1, MAX_ELEMENTS + 1), np.float32)), "application/x-npy", 400,
     f"{MAX_ELEMENTS + 1} elements exceed the limit of {MAX_ELEMENTS}", None),
    ("json elements",
     json.dumps({"inputs": {"x": {"data": [0.0] * (MAX_ELEMENTS + 1)}}}).encode(), "application/json", 400,
     f"more than {MAX_ELEMENTS} tensor elements in one request", None),
    ("body size", b"[" + b"0," * (MAX_BODY // 2) + b"0]", "application/json", 413,
     f"exceeds the limit of {MAX_BODY}", None),
]
# fmt: on


def test_bad_tensors_get_one_line_reasons_and_the_service_keeps_serving(svc: Harness) -> None:
    before = svc.health()
    for case, body, ctype, status, reason, _check in BAD:
        code, err = svc.post(body, ctype)
        assert code == status, (case, code, err)
        assert err == {"error": err["error"], "status": status}, (case, err)
        assert reason in err["error"] and "\n" not in err["error"], (case, err["error"])
        svc.good()  # still serving, right after each bad request
    code, err = _chunked_post(svc.dev, MAX_BODY + 1)
    assert code == 413 and err["error"] == f"body exceeds the limit of {MAX_BODY} bytes", err
    svc.good()
    # Security counters: no token, a wrong token, a token without the infer scope.
    code, err = svc.dev.request("POST", "/v1/infer", GOOD, token=None)
    assert (code, err) == (401, {"error": "missing bearer token", "status": 401})
    assert svc.dev.request("POST", "/v1/infer", GOOD, token="y" * 24)[0] == 401
    code, err = svc.dev.request("POST", "/v1/infer", GOOD, token=STATUS)
    assert code == 403 and err["error"] == "token 'mon' lacks the 'infer' scope", err
    svc.good()

    after = svc.health()
    n400 = sum(1 for c in BAD if c[3] == 400)
    n413 = sum(1 for c in BAD if c[3] == 413) + 1
    guard = [c[5] for c in BAD if c[5] is not None]
    resp0, resp1 = before["sources"]["api"]["responses"], after["sources"]["api"]["responses"]
    assert resp1["400"] - resp0["400"] == n400
    assert resp1["413"] - resp0["413"] == n413
    assert resp1["ok"] - resp0["ok"] >= len(BAD) + 1
    for check in set(guard):
        assert after["rejections"][check] - before["rejections"][check] == guard.count(check), check
    assert after["rejected"] - before["rejected"] == len(guard)
    assert after["security"]["rejected_inputs"] == after["rejected"]
    sec0, sec1 = before["security"], after["security"]
    assert sec1["api_unauthorized"] - sec0["api_unauthorized"] == 2
    assert sec1["api_forbidden"] - sec0["api_forbidden"] == 1
    # The heartbeat carries the same counters.
    hb = svc.wait_heartbeat(
        lambda h: (
            h["security"]["rejected_inputs"] >= after["rejected"]
            and h["security"]["api_forbidden"] >= sec1["api_forbidden"]
            and h["sources"]["api"]["responses"]["413"] >= resp1["413"]
        )
    )
    assert hb["state"] == "serving" and hb["rejections"]["finite"] >= 4
    svc.all_delivered()


# ------------------------------------------------------------------------------- 3. broker kill -9 mid-stream
def test_broker_killed_mid_stream_loses_nothing_acknowledged(svc: Harness) -> None:
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            codes.append(svc.post(GOOD)[0])

    first = len(svc.acked)
    clients = [threading.Thread(target=client) for _ in range(3)]  # three applications sending at once
    for t in clients:
        t.start()
    try:
        svc.dev.wait(lambda: len(svc.acked) >= first + 60, 30, "requests before the kill")
        svc.broker_kill()  # while results are being published: some are in flight, not yet PUBACKed
        at_kill = len(svc.acked)
        svc.dev.wait(lambda: len(svc.acked) >= at_kill + 40, 30, "requests while the broker is down")
        time.sleep(0.3)  # down for a while: the link's reconnect attempts fail, backoff grows
        svc.broker_up()
        svc.dev.wait(lambda: len(svc.acked) >= at_kill + 100, 30, "requests after the restart")
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert codes and set(codes) == {200}, codes  # the API never depended on the broker
    svc.all_delivered(60)
    svc.wait_heartbeat(lambda h: h["link"]["connects"] >= 2 and h["outbox"]["depth"] == 0)


# ------------------------------------------------------------------------------ 5. garbage on the input topic
def _publisher(broker: MosquittoBroker) -> mqtt.Client:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gateway-{time.monotonic_ns()}")
    pub.username_pw_set("rec", "recpw")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    return pub


def _publish(pub: mqtt.Client, payload: bytes) -> None:
    pub.publish(INPUT_TOPIC, payload, qos=1).wait_for_publish(10)


def test_garbage_and_oversize_mqtt_input_dropped_counted_and_serving(svc: Harness) -> None:
    before = svc.health()
    pub = _publisher(svc.broker)
    try:
        _publish(pub, b"{not json")
        _publish(pub, b"\x00\x01\x02 binary garbage")
        _publish(pub, b'{"inputs": {"x": [[0.1, NaN, 0.3, 0.4]]}}')
        _publish(pub, b"{" + b" " * (1048576 + 1) + b"}")  # over sources.mqtt / link inbound limits
        _publish(pub, b'{"inputs": {"x": [[0.5, 0.5, 0.5, 0.5]]}, "id": "mq-good"}')
    finally:
        pub.loop_stop()
        pub.disconnect()
    svc.wait_result(lambda d: d["data"]["correlation_id"] == "mq-good")  # served after the garbage
    reasons = [e["reason"] for e in svc.events() if e["kind"] == "input-rejected" and e["source"] == "mqtt"]
    assert any(r.startswith("malformed JSON: ") for r in reasons), reasons
    assert any(r.startswith("unsupported content type") for r in reasons), reasons
    assert any("1 NaN and 0 Inf values" in r for r in reasons), reasons
    assert all("\n" not in r for r in reasons)
    after = svc.health()
    m0, m1 = before["sources"]["mqtt"], after["sources"]["mqtt"]
    assert m1["rejected"] - m0["rejected"] == 3 and m1["ok"] - m0["ok"] == 1
    hb = svc.wait_heartbeat(lambda h: h["link"]["inbound_dropped"] >= 1)  # the oversize one: counted
    assert hb["state"] == "serving"
    svc.good()
    svc.all_delivered()


def test_oversize_mqtt_input_raises_an_event(svc: Harness) -> None:
    before = svc.health()["sources"]["mqtt"]
    pub = _publisher(svc.broker)
    try:
        _publish(pub, b"{" + b" " * (1048576 + 1) + b"}")
        _publish(pub, b'{"marker": 1}')  # refused as an unknown key; its event follows the oversize one's
    finally:
        pub.loop_stop()
        pub.disconnect()
    svc.wait_event(lambda e: e["kind"] == "input-rejected" and "marker" in e["reason"])
    reasons = [e["reason"] for e in svc.events() if e["kind"] == "input-rejected"]
    after = svc.health()["sources"]["mqtt"]
    assert after["oversize"] - before["oversize"] == 1, after
    assert any("exceeds the limit" in r for r in reasons), reasons


# -------------------------------------------------------------------------------------- 4. full disk
@contextlib.contextmanager
def small_state_dir(root: Path) -> Iterator[tuple[Harness, Path]]:
    """A service whose state_dir (outbox, supervisor.json) is a 4 MiB tmpfs; yields it and a filler path."""
    state = root / "state"
    state.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for state_dir (needs CAP_SYS_ADMIN): {r.stderr.decode().strip()}")
    dev, broker = start_service(root, extra="\n[outbox]\ndisk_retry_s = 0.2\n")
    h = Harness(dev, broker)
    filler = state / "filler"
    try:
        h.broker_up(wait_device=False)
        dev.start()
        dev.wait_ready()
        yield h, filler
    finally:
        with contextlib.suppress(OSError):
            filler.unlink()
        dev.stop()
        h.close()
        broker.kill()
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(filler: Path) -> None:
    """The file system full to the last block (ENOSPC)."""
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)


def test_full_disk_under_the_outbox_keeps_answering_and_delivers_later(tmp_path: Path) -> None:
    with small_state_dir(tmp_path) as (h, filler):
        dev = h.dev
        for _ in range(3):
            h.good()
        h.all_delivered()
        fill(filler)
        during = [h.good() for _ in range(5)]  # the API keeps answering
        hb = h.wait_heartbeat(lambda x: bool(x["outbox"]["alarm"]))
        assert hb["outbox"]["alarm"].startswith("disk unavailable: "), hb["outbox"]
        assert "\n" not in hb["outbox"]["alarm"]
        h.wait_event(lambda e: e["kind"] == "outbox_disk_full")
        health = h.health()
        assert health["ok"] is False and health["alarm"].startswith("outbox: disk unavailable")
        assert health["outbox"]["alarm"] == hb["outbox"]["alarm"]
        dev.wait(
            lambda: any("STATUS=DEGRADED: outbox: disk unavailable" in n for n in dev.notifications()),
            10,
            "STATUS= naming the outbox alarm",
        )
        # Broker gone as well: these results exist only in the outbox's memory queue.
        h.broker_kill()
        held = [h.good() for _ in range(5)]
        # The watchdogs keep being kicked through the alarm (WATCHDOG_USEC is 2 s here): a restart could not
        # free the disk and would lose the results held in memory, already acknowledged with 200.
        mark = len(dev.notifications())
        time.sleep(2.5)
        assert any("WATCHDOG=1" in n for n in dev.notifications()[mark:]), "watchdog starved by a full disk"
        filler.unlink()  # space returns
        dev.wait(lambda: h.health()["ok"] is True, 20, "outbox alarm cleared")
        h.broker_up()
        h.all_delivered()
        assert h.delivery is not None and set(during + held) <= h.delivery.seen
        h.wait_event(lambda e: e["kind"] == "outbox_recovered")
        hb = h.wait_heartbeat(lambda x: x["outbox"]["alarm"] is None and x["outbox"]["memory_depth"] == 0)
        assert hb["outbox"]["dropped_total"] == 0
        h.good()
        h.all_delivered()


def test_a_result_too_large_for_the_outbox_is_a_clear_error_and_the_service_keeps_serving(
    tmp_path: Path,
) -> None:
    """A result the outbox cannot keep (larger than outbox.max_payload_bytes) is answered with a one-line
    reason naming that key, not a bare "internal error"; it is not acknowledged, and the service serves on."""
    dev, broker = start_service(tmp_path, extra="\n[outbox]\nmax_payload_bytes = 64\n")
    try:
        dev.start()
        dev.wait_ready()
        for _ in range(2):
            code, doc = dev.request("POST", "/v1/infer", GOOD, token=INFER)
            assert code == 500, doc
            assert doc["error"].startswith("result not kept: "), doc
            assert "max_payload_bytes=64" in doc["error"], doc
            assert "id" not in doc and "\n" not in doc["error"]
        code, health = dev.request("GET", "/v1/health", token=STATUS)
        assert code == 200 and health["state"] == "serving", health
        assert health["outbox"]["depth"] == 0, health["outbox"]
    finally:
        dev.stop()
        broker.kill()
