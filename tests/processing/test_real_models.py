"""The processing chain on the real YOLOv8n (NudeNet 320n) and real photographs, plus OOD flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgeguard import zoo
from edgeguard.engine.guard import InputGuard
from edgeguard.engine.ood import OodMonitor, compute_input_stats, input_stats_for, parse_input_stats
from edgeguard.engine.postprocess import Postprocessor
from edgeguard.engine.preprocess import Preprocessor
from edgeguard.errors import ConfigError, InputRejected

from ._manifests import yolo_manifest


@pytest.fixture(scope="module")
def yolo(yolov8n_path: Path) -> Any:
    return ort.InferenceSession(str(yolov8n_path), providers=["CPUExecutionProvider"])


def detect(session: Any, image: bytes | np.ndarray) -> dict[str, Any]:
    m = yolo_manifest()
    pre, post = Preprocessor.from_manifest(m), Postprocessor.from_manifest(m)
    assert pre is not None and post is not None
    prepared = pre(image)
    inputs = InputGuard(m).check(prepared.tensors)
    (out,) = session.run(None, inputs)
    assert out.shape == (1, 22, 2100)
    return post({"output0": out}, prepared.transform)


def test_astronaut_face_is_found_in_original_coordinates(yolo: Any, astronaut_png: Path) -> None:
    result = detect(yolo, astronaut_png.read_bytes())
    top = result["detections"][0]
    assert top["label"] == "FACE_FEMALE"
    assert top["score"] > 0.5
    x1, y1, x2, y2 = top["box"]
    # The astronaut's face in the 512x512 photograph lies around x 170-280, y 75-185.
    assert 140 < x1 < x2 < 310 and 50 < y1 < y2 < 220
    assert 60 < x2 - x1 < 160 and 60 < y2 - y1 < 160


def test_letterboxed_wide_crop_maps_back_to_the_same_face(yolo: Any, astronaut_png: Path) -> None:
    """A 512x300 crop is letterboxed with padding; the face box must come back in the crop's pixels."""
    from PIL import Image

    pixels = np.asarray(Image.open(astronaut_png).convert("RGB"))
    full = detect(yolo, pixels)["detections"][0]
    crop = detect(yolo, np.ascontiguousarray(pixels[20:320]))["detections"][0]
    assert crop["label"] == full["label"] == "FACE_FEMALE"
    shifted = [crop["box"][0], crop["box"][1] + 20, crop["box"][2], crop["box"][3] + 20]
    np.testing.assert_allclose(shifted, full["box"], atol=12)


def test_coffee_has_no_face(yolo: Any, coffee_png: Path) -> None:
    labels = {d["label"] for d in detect(yolo, coffee_png.read_bytes())["detections"]}
    assert not labels & {"FACE_FEMALE", "FACE_MALE"}


def _tensor(path: Path) -> np.ndarray:
    pre = Preprocessor.from_manifest(yolo_manifest())
    assert pre is not None
    return pre(path.read_bytes()).tensors["images"]


def test_ood_flags_noise_but_not_a_held_out_photo(
    astronaut_png: Path, coffee_png: Path, text_png: Path
) -> None:
    stats = compute_input_stats([_tensor(p) for p in (astronaut_png, coffee_png, text_png)],
                                input_name="images", channel_axis=1)
    monitor = OodMonitor.from_manifest(yolo_manifest(input_stats=stats))
    assert monitor is not None
    cat = _tensor(zoo.fetch("chelsea.png"))  # never seen by the statistics
    assert monitor.check({"images": cat}).flagged is False
    pre = Preprocessor.from_manifest(yolo_manifest())
    assert pre is not None
    noise = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    verdict = monitor.check(pre(noise).tensors)
    assert verdict.flagged and verdict.reason is not None and "texture" in verdict.reason
    blank = monitor.check(pre(np.zeros((64, 64, 3), np.uint8)).tensors)
    assert blank.flagged and blank.reason is not None and "contrast" in blank.reason
    assert monitor.counts() == {"checked": 3, "flagged": 2}


def test_ood_reject_action_raises(astronaut_png: Path) -> None:
    stats = compute_input_stats([_tensor(astronaut_png)], input_name="images", action="reject")
    monitor = OodMonitor.from_manifest(yolo_manifest(input_stats=stats))
    assert monitor is not None
    with pytest.raises(InputRejected, match=r"^input 'images' is out of distribution: channel 0 contrast"):
        monitor.check({"images": np.zeros((1, 3, 320, 320), np.float32)})
    assert monitor.flagged == 1


BAD_STATS = [
    ({"mean": [0.5], "std": [0.2], "smoothness": [0.9], "count": 1, "channel_axis": 1},
     "input_stats.mean: 1 channels but input 'images' axis 1 is 3"),
    ({"mean": [0.5] * 3, "std": [0.2] * 3, "smoothness": [0.9] * 3, "count": 1, "channel_axis": 7},
     "input_stats.channel_axis: 7 is outside [-4, 3]"),
    ({"mean": [0.5] * 3, "std": [0.2] * 3, "count": 1, "channel_axis": 1},
     "input_stats: missing key 'smoothness'"),
    ({"mean": [0.5] * 3, "std": [0.2] * 3, "smoothness": [0.9] * 3, "count": 1, "channel_axis": 1,
      "action": "drop"},
     "input_stats.action: 'drop' is not one of flag, reject"),
    ({"mean": [0.5] * 3, "std": [0.2] * 3, "smoothness": [0.9] * 3, "count": 1, "channel_axis": 1,
      "version": 2},
     "input_stats.version: 2 is outside [1, 1]"),
]


@pytest.mark.parametrize(("decl", "message"), BAD_STATS, ids=[m for _, m in BAD_STATS])
def test_bad_input_stats_are_refused(decl: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_input_stats(yolo_manifest(input_stats=decl))
    assert str(err.value) == message


def test_input_stats_for_a_manifest_uses_the_declared_layout(astronaut_png: Path, coffee_png: Path) -> None:
    m = yolo_manifest()
    stats = input_stats_for(m, [{"images": _tensor(p)} for p in (astronaut_png, coffee_png)])
    assert stats["input"] == "images" and stats["channel_axis"] == 1 and stats["count"] == 2
    assert len(stats["mean"]) == 3
    parsed = parse_input_stats(yolo_manifest(input_stats=stats))
    assert parsed is not None and parsed.action == "flag"
