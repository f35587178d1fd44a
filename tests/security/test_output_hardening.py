"""Output hardening with a real model (PP-OCR's text orientation classifier from its PyPI wheel, real
onnxruntime) on the real service: the raw output tensor's values never leave the device — not in the API's
answer, not in the MQTT results captured from a real mosquitto (API, MQTT input and directory sources), not
in the outbox's records — while the declared top-k result does. A control bundle without the declaration
shows the same checks do find the raw values. Plus the hardening rules on our own seam, and pack/inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeguard import zoo
from edgeguard.bundle import inspect_bundle
from edgeguard.bundle.manifest import NoiseSpec, OutputPolicy
from edgeguard.engine import InferenceResult
from edgeguard.engine.harden import result_json
from edgeguard.keys import derive_storage_key, load_device_key
from edgeguard.outbox import Outbox
from tests.service._env import Device, seal
from tests.support.broker import MosquittoBroker, Recorder

INPUT_TOPIC = "edgeguard/v1/test/dev-1/input"
OUT = "save_infer_model/scale_0.tmp_1"
META: dict[str, Any] = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 48, 192], "range": [-1.0, 1.0]}],
    "outputs": [{"name": OUT, "dtype": "float32", "shape": [1, 2]}],
}
HARDENED = {"top_k": 1, "round_decimals": 2, "raw_logits": False,
            "noise": {"kind": "laplace", "scale": 0.001}}


@pytest.fixture(scope="module")
def cls_model() -> Path:
    try:
        return zoo.fetch("ppocr-cls")
    except zoo.ZooError as exc:
        pytest.fail(f"the real model could not be fetched: {exc}")


def _input(seed: int) -> np.ndarray:
    # Three decimals: the JSON body holds exactly the float32 values the reference run below gets.
    x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 48, 192)).round(3)
    return x.astype(np.float32)


def _reference(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0], dtype=np.float32)


def _fingerprints(raw: np.ndarray) -> list[bytes]:
    """What a leaked raw value would look like in JSON: its first five decimals (truncated, so a value
    recomputed with other threads, differing in the last bits, is still found)."""
    out = []
    for v in raw.ravel():
        text = repr(float(v))
        out.append(text[: text.index(".") + 6].encode())
    return out


def _leaks(blob: bytes, raw: np.ndarray) -> list[bytes]:
    return [f for f in _fingerprints(raw) if f in blob]


def _body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def _run(tmp_path: Path, model: Path, output: dict[str, Any] | None) -> dict[str, Any]:
    """Serve the model, send one input by each source, capture what leaves; the outbox is read after a
    fourth request made while the broker is down (so its record is still there)."""
    meta = dict(META, output=output) if output is not None else META
    x0 = _input(0)
    inputs = {"api": _input(1), "mqtt": _input(2), "directory": _input(3), "outbox": _input(4)}
    captured: dict[str, Any] = {}
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        bundle = seal(tmp_path, model.read_bytes(), name="ppocr-cls", version=1, meta=meta,
                      golden_in={"x": x0})
        dev.provision(bundle, directory=True)
        dev.start()
        try:
            dev.wait_ready()
            code, answer = dev.request("POST", "/v1/infer", _body(inputs["api"]))
            assert code == 200, answer
            captured["api"] = json.dumps(answer).encode()
            captured["api_doc"] = answer
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway")
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            pub.publish(INPUT_TOPIC, _body(inputs["mqtt"]), qos=1).wait_for_publish(10)
            pub.loop_stop()
            pub.disconnect()
            incoming = tmp_path / "incoming"
            part = incoming / "x.json.part"
            part.write_bytes(_body(inputs["directory"]))
            os.replace(part, incoming / "x.json")

            def sources() -> set[str]:
                return {json.loads(p)["data"]["source"] for p in rec.on_topic("/results")}

            assert rec.wait_for(lambda _m: {"api", "mqtt", "directory"} <= sources(), 60), dev.log_tail()
            captured["mqtt"] = b"\n".join(rec.on_topic("/results"))
            broker.stop()  # what is inferred now stays in the outbox
            code, answer = dev.request("POST", "/v1/infer", _body(inputs["outbox"]))
            assert code == 200, answer
        finally:
            assert dev.stop() == 0
    storage_key = derive_storage_key(load_device_key(tmp_path / "keys/device.key"))
    outbox = Outbox(path=dev.state / "outbox", storage_key=storage_key, device_id="dev-1")
    try:
        items = outbox.peek(after=0, limit=100)
    finally:
        outbox.close()
    assert items, "the result made while the broker was down is in the outbox"
    captured["outbox"] = b"\n".join(bytes(i.payload) for i in items)
    captured["raw"] = {k: _reference(model, v) for k, v in inputs.items()}
    return captured


def test_raw_outputs_never_leave_a_hardened_bundle(tmp_path: Path, cls_model: Path) -> None:
    got = _run(tmp_path, cls_model, HARDENED)
    raw = got["raw"]
    for where in ("api", "mqtt", "outbox"):
        for source, values in raw.items():
            assert not _leaks(got[where], values), (where, source, got[where][:400])
        assert b'"outputs"' not in got[where] and OUT.encode() not in got[where], got[where][:400]
    # What may leave does: the top class with its score to 2 decimals (noise of scale 0.001 on top).
    doc = got["api_doc"]
    best = int(np.argmax(raw["api"]))
    assert doc["post"]["kind"] == "topk" and len(doc["post"]["top"]) == 1, doc
    top = doc["post"]["top"][0]
    assert top["class"] == best and abs(top["score"] - float(raw["api"].ravel()[best])) <= 0.02, (top, raw)
    assert round(top["score"], 2) == top["score"]


def test_control_without_the_declaration_the_raw_outputs_do_leave(tmp_path: Path, cls_model: Path) -> None:
    got = _run(tmp_path, cls_model, None)
    raw = got["raw"]
    assert _leaks(got["api"], raw["api"]) and _leaks(got["outbox"], raw["outbox"])
    assert _leaks(got["mqtt"], raw["mqtt"]) and _leaks(got["mqtt"], raw["directory"])


# -- the rules, on our own seam (an InferenceResult built here) --------------------------------------------

def _result(post: dict[str, Any] | None, outputs: dict[str, np.ndarray] | None = None) -> InferenceResult:
    return InferenceResult(outputs=outputs or {"y": np.array([[0.1234567, 0.7654321, 0.111]], np.float32)},
                           post=post, latency_ms=1.0, backend="onnxruntime", accelerator="cpu")


DETECTIONS = {"kind": "detections", "detections": [
    {"class": 0, "label": "face", "score": 0.912345, "box": [10.123, 20.456, 30.789, 40.111]},
    {"class": 3, "label": None, "score": 0.512345, "box": [1.0, 2.0, 3.0, 4.0]},
    {"class": 1, "label": None, "score": 0.312345, "box": [5.0, 6.0, 7.0, 8.0]},
]}


def test_undeclared_keeps_the_old_result_exactly() -> None:
    r = _result(None)
    assert result_json(r, None) == r.to_json() and "outputs" in r.to_json()


def test_top_k_and_rounding_on_detections() -> None:
    doc = result_json(_result(DETECTIONS), OutputPolicy(top_k=2, round_decimals=1))
    dets = doc["post"]["detections"]
    assert [d["score"] for d in dets] == [0.9, 0.5] and dets[0]["box"] == [10.1, 20.5, 30.8, 40.1]
    assert "outputs" not in doc


def test_derived_top_k_without_postprocess_and_raw_outputs_only_when_allowed() -> None:
    doc = result_json(_result(None), OutputPolicy(top_k=2, round_decimals=3))
    top = [{"class": 1, "score": 0.765}, {"class": 0, "score": 0.123}]
    assert doc["post"] == {"kind": "topk", "top": top}
    assert "outputs" not in doc
    allowed = result_json(_result(None), OutputPolicy(round_decimals=2, raw_logits=True))
    assert allowed["outputs"]["y"]["data"] == [[0.12, 0.77, 0.11]]
    big = np.linspace(0, 1, 5000, dtype=np.float32).reshape(1, 5000)
    noised = result_json(_result(None, {"y": big}),
                         OutputPolicy(raw_logits=True, noise=NoiseSpec(kind="gaussian", scale=0.01)))
    delta = np.array(noised["outputs"]["y"]["data"]) - big
    assert noised["outputs"]["y"]["shape"] == [1, 5000] and 0.009 < float(np.std(delta)) < 0.011


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_noise_is_calibrated_fresh_per_request_and_keeps_probabilities_in_range(kind: str) -> None:
    policy = OutputPolicy(noise=NoiseSpec(kind=kind, scale=0.05))  # type: ignore[arg-type]
    post = {"kind": "topk", "top": [{"class": 0, "score": 0.5}]}
    scores = np.array([result_json(_result(post), policy)["post"]["top"][0]["score"] for _ in range(4000)])
    assert np.all((scores >= 0) & (scores <= 1)) and len(set(scores.tolist())) > 3900
    # Laplace(b): mean |x| = b; Gaussian(sigma): std = sigma. 4000 draws: within 15 % (about 7 std errors).
    spread = np.mean(np.abs(scores - 0.5)) if kind == "laplace" else np.std(scores)
    assert 0.85 * 0.05 < spread < 1.15 * 0.05, spread


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeguard", *args], capture_output=True, text=True,
                          timeout=300)


def test_pack_flags_declare_it_inspect_shows_it_and_bad_values_are_one_line(
    tmp_path: Path, cls_model: Path
) -> None:
    assert _cli("keygen", "publisher", "--out", str(tmp_path)).returncode == 0
    assert _cli("keygen", "device", "--out", str(tmp_path)).returncode == 0
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(META))
    base = [
        "pack", str(cls_model), "--name", "cls", "--version", "1",
        "--sign-key", str(tmp_path / "publisher.key"), "--recipient", str(tmp_path / "device.pub"),
        "--meta", str(meta),
    ]
    out = tmp_path / "cls.egm"
    done = _cli(*base, "--top-k", "1", "--round-decimals", "2", "--no-raw-logits", "--noise", "laplace:0.01",
                "-o", str(out))
    assert done.returncode == 0, done.stderr
    want = {"top_k": 1, "round_decimals": 2, "raw_logits": False, "noise": {"kind": "laplace", "scale": 0.01}}
    shown = _cli("inspect", str(out))
    assert json.loads(shown.stdout)["output_hardening"] == want
    assert inspect_bundle(out)["manifest"]["output"] == want  # type: ignore[index]
    plain = tmp_path / "plain.egm"
    assert _cli(*base, "-o", str(plain)).returncode == 0
    assert "output" not in inspect_bundle(plain)["manifest"]  # type: ignore[operator]
    for flags, says in ((["--round-decimals", "9"], "round_decimals"),
                        (["--noise", "uniform:0.1"], "noise.kind"),
                        (["--noise", "laplace:nan"], "noise.scale"), (["--top-k", "0"], "top_k")):
        bad = _cli(*base, *flags, "-o", str(tmp_path / "bad.egm"))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (flags, bad.stderr)
        assert says in bad.stderr, bad.stderr
