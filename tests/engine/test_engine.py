"""The engine on real models: YOLOv8n (onnxruntime) and BlazeFace (LiteRT), bad inputs, health."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec, Tolerance
from edgeguard.engine import Engine, InferenceResult
from edgeguard.errors import BackendError, InputRejected
from edgeguard.profiles import Accelerator, get_profile

from .support import (
    HOST_PROFILE,
    HOST_PROFILES,
    PlainSource,
    golden_from,
    manifest_for,
    profile_with,
    wait_standby,
)

YOLO_IN = TensorSpec("images", "float32", (1, 3, 320, 320), (0.0, 1.0))
YOLO_OUT = TensorSpec("output0", "float32", (1, 22, 2100))


@pytest.fixture(scope="module", params=HOST_PROFILES)
def yolo(yolov8n_path: Path, request: pytest.FixtureRequest) -> Any:
    model = yolov8n_path.read_bytes()
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    golden = golden_from("onnx", model, {"images": x})
    man = manifest_for("onnx", "yolov8n", [YOLO_IN], [YOLO_OUT], golden_count=1,
                       golden_tolerance=Tolerance(rtol=1e-3, atol=1e-3),
                       preprocess={"size": [320, 320], "layout": "NCHW", "resize": "letterbox"},
                       postprocess={"kind": "yolov8", "conf": 0.25, "iou": 0.45})
    src = PlainSource(man, bytearray(model), [golden])
    engine = Engine.load(src, profile=get_profile(request.param))
    yield engine
    engine.close()


def test_yolo_image_end_to_end(yolo: Engine, astronaut_png: Path) -> None:
    result = yolo.infer_image(astronaut_png.read_bytes())
    assert result.backend == "onnxruntime" and result.accelerator == "cpu"
    assert result.outputs["output0"].shape == (1, 22, 2100)
    assert result.post is not None and result.post["kind"] == "detections"
    doc = result.to_json()
    json.dumps(doc)
    assert "outputs" not in doc and doc["accelerator"] == "cpu"


def _bad_inputs() -> list[tuple[str, Callable[[], Any], str]]:
    ok = np.zeros((1, 3, 320, 320), np.float32)
    nan = ok.copy()
    nan[0, 1, 2, 3] = np.nan
    return [
        ("wrong name", lambda: {"image": ok}, "unknown input 'image'"),
        ("missing", lambda: {}, "missing input 'images'"),
        ("dtype", lambda: {"images": ok.astype(np.float64)}, "float64"),
        ("shape", lambda: {"images": np.zeros((1, 3, 32, 32), np.float32)}, "shape"),
        ("nan", lambda: {"images": nan}, "images"),
        ("range", lambda: {"images": ok + 2.0}, "range"),
        ("not an array", lambda: {"images": [[1.0]]}, "numpy array"),
    ]


@pytest.mark.parametrize(("case", "make", "fragment"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_rejected_counted_and_the_engine_keeps_serving(
    yolo: Engine, case: str, make: Callable[[], Any], fragment: str
) -> None:
    before = yolo.health()
    with pytest.raises(InputRejected) as info:
        yolo.infer(make())
    assert fragment in str(info.value) and "\n" not in str(info.value)
    after = yolo.health()
    assert after["rejected"] == before["rejected"] + 1
    assert after["inferences"] == before["inferences"]
    good = yolo.infer({"images": np.full((1, 3, 320, 320), 0.5, np.float32)})
    assert isinstance(good, InferenceResult) and yolo.health()["inferences"] == before["inferences"] + 1


def test_bad_image_bytes_are_rejected(yolo: Engine) -> None:
    with pytest.raises(InputRejected, match="image"):
        yolo.infer_image(b"\x89PNG\r\n\x1a\nnot really")


def test_health_is_json_and_reports_latency(yolo: Engine, request: pytest.FixtureRequest) -> None:
    yolo.infer({"images": np.full((1, 3, 320, 320), 0.25, np.float32)})
    h = yolo.health()
    json.dumps(h)
    assert h["profile"] == request.node.callspec.params["yolo"] and h["model"]["name"] == "yolov8n"
    assert h["latency_ms"]["p50"] is not None and h["latency_ms"]["p99"] >= h["latency_ms"]["p50"]
    assert h["selftest_ms"] > 0 and h["load_ms"] >= h["selftest_ms"]


def test_blazeface_on_litert(blazeface_path: Path, astronaut_png: Path) -> None:
    model = blazeface_path.read_bytes()
    spec = TensorSpec("input", "float32", (1, 128, 128, 3), (-1.0, 1.0))
    man = manifest_for("tflite", "blazeface", [spec], golden_count=0,
                       golden_tolerance=Tolerance(rtol=1e-3, atol=1e-3),
                       preprocess={"size": [128, 128], "layout": "NHWC", "scale": 2.0 / 255.0,
                                   "mean": [1.0, 1.0, 1.0], "resize": "stretch"})
    src = PlainSource(man, bytearray(model), [])  # no golden vectors: the builtin-kernel reference decides
    with Engine.load(src, profile=get_profile("raspberry-pi-4")) as engine:
        result = engine.infer_image(astronaut_png.read_bytes())
        assert result.backend == "litert" and result.accelerator == "xnnpack"
        scores = result.outputs["classificators"].reshape(-1)
        assert float(scores.max()) > 0.0  # the astronaut's face gives a confident logit somewhere
        wait_standby(engine)  # the builtin standby is the kept reference session, adopted in the background
        assert [c.status for c in engine.candidates()] == ["active", "standby"]
    assert src.wiped and not any(src.model)
    with pytest.raises(BackendError, match="closed"):
        engine.infer({"input": np.zeros((1, 128, 128, 3), np.float32)})


def test_model_without_preprocessing_refuses_images(yolov8n_path: Path) -> None:
    model = yolov8n_path.read_bytes()
    man = manifest_for("onnx", "raw", [YOLO_IN], [YOLO_OUT])
    engine = Engine.load(PlainSource(man, bytearray(model)), profile=get_profile(HOST_PROFILE))
    with engine, pytest.raises(InputRejected, match="declares no image preprocessing"):
        engine.infer_image(np.zeros((10, 10, 3), np.uint8))


def test_corrupt_model_fails_to_load_with_one_line(tmp_path: Path) -> None:
    man = manifest_for("onnx", "junk", [YOLO_IN])
    src = PlainSource(man, bytearray(b"\x08\x07not a model" * 10))
    with pytest.raises(BackendError) as info:
        Engine.load(src, profile=get_profile(HOST_PROFILE))
    assert "cpu-reference" in str(info.value) or "cpu" in str(info.value)
    assert "\n" not in str(info.value) and src.wiped


def test_input_the_model_cannot_run_is_refused_without_demoting(yolov8n_path: Path) -> None:
    # Dynamic height/width pass the guard, but 100x100 is not a multiple of the detector's stride: onnxruntime
    # raises on every accelerator. The accelerators pass their self-test, so the request is refused, not them.
    model = yolov8n_path.read_bytes()
    spec = TensorSpec("images", "float32", (1, 3, None, None), (0.0, 1.0))
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    man = manifest_for("onnx", "yolo-dyn", [spec], golden_count=1)
    src = PlainSource(man, bytearray(model), [golden_from("onnx", model, {"images": x})])
    prof = profile_with("onnx", [Accelerator(kind="cpu", label="a"), Accelerator(kind="cpu", label="b")])
    with Engine.load(src, profile=prof) as engine:
        expected = r"the model cannot run this input \(a passes its self-test\)"
        with pytest.raises(InputRejected, match=expected):
            engine.infer({"images": np.zeros((1, 3, 100, 100), np.float32)})
        h = engine.health()
        assert h["degraded"] is False and h["demotions"] == 0 and h["rejections"]["model"] == 1
        assert engine.infer({"images": x}).accelerator == "a"
