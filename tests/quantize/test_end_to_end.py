"""`edgeguard quantize` on real models: YOLOv8n is quantized without node lists, PP-OCR det is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeguard import zoo
from edgeguard.cli import main
from edgeguard.engine.postprocess import box_iou, decode_yolov8
from edgeguard.engine.preprocess import Preprocessor
from edgeguard.quantize import QuantizeOptions, quantize_onnx

from ._models import classifier_model

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "text.png")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for key in PHOTOS:
        (folder / key).write_bytes(zoo.fetch(key).read_bytes())
    return folder


def _detect(session: Any, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (out,) = session.run(None, {"images": tensor})
    return decode_yolov8(out[0], conf=0.25, iou=0.45, max_detections=100)


def test_yolov8n_quantized_keeps_top_classes_and_boxes(
    yolov8n_path: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "y8-int8.onnx", tmp_path / "report.json"
    code = main(["quantize", str(yolov8n_path), "--calibration", str(photo_dir), "-o", str(out),
                 "--input-shape", "images=1,3,320,320", "--bench-runs", "10", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "choice:" in printed and f"wrote the int8 model to {out}" in printed
    data = json.loads(report.read_text())
    assert data["chosen"] in {c["name"] for c in data["candidates"] if c["passes"]}
    assert data["kinds"] == ["boxes"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    fp32 = ort.InferenceSession(str(yolov8n_path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pre = Preprocessor.from_manifest(_yolo_manifest())
    assert pre is not None
    judged = 0
    for key in PHOTOS:
        tensor = pre(zoo.fetch(key).read_bytes()).tensors["images"]
        ref_boxes, _, ref_classes = _detect(fp32, tensor)
        got_boxes, _, got_classes = _detect(int8, tensor)
        assert set(ref_classes[:3].tolist()) == set(got_classes[:3].tolist()), key
        if ref_boxes.shape[0]:
            assert ref_classes[0] == got_classes[0], key
            assert float(box_iou(ref_boxes[:1], got_boxes[:1])[0, 0]) >= 0.9, key
            judged += 1
    assert judged >= 1  # the astronaut's face at least


def _yolo_manifest() -> Any:
    from tests.processing._manifests import yolo_manifest

    return yolo_manifest()


def test_ppocr_det_is_kept_fp32_by_the_accuracy_guard(
    ppocr_det_path: Path, text_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PP-OCR det int8 loses most of the faint text of text.png: no candidate may pass, fp32 is kept."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "text.png").write_bytes(text_png.read_bytes())
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"resize": "letterbox", "anchor": "top_left", "pad_value": 0,
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    out = tmp_path / "ocr-int8.onnx"
    code = main(["quantize", str(ppocr_det_path), "--calibration", str(tmp_path / "imgs"), "-o", str(out),
                 "--input-shape", "x=1,3,640,640", "--preprocess", str(pre), "--samples", "8",
                 "--bench-runs", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "choice: kept fp32: best candidate " in captured.out
    assert "below the accuracy budget (min mask IoU at 0.3 " in captured.out
    assert "opset 12 -> 13" in captured.out
    assert out.read_bytes() == ppocr_det_path.read_bytes()  # the original, unchanged


def test_classifier_from_npz_uses_top1_agreement(tmp_path: Path) -> None:
    model = classifier_model(tmp_path / "cls.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).random((12, 3, 16, 16), dtype=np.float32))
    report = quantize_onnx(model, calib, tmp_path / "cls-int8.onnx",
                           options=QuantizeOptions(budget=0.5, bench_runs=3, min_speedup=0.01))
    assert report.kinds == ("classes",)
    assert report.chosen is not None
    assert (tmp_path / "cls-int8.onnx").is_file()
    assert report.to_json()["candidates"][0]["agreement"][0]["metric"] == "top-1 agreement"


CLI_ERRORS = [
    (["--calibration", "{imgs}", "-o", "{out}"],
     "input 'images' has dynamic axes [?, 3, ?, ?]: give a static shape with --input-shape images=1,3,H,W "
     "(or the calibration .npz shape)"),
    (["-o", "{out}"], "--calibration DATA is required to quantize an ONNX model"),
    (["--calibration", "{imgs}", "-o", "{out}", "--input-shape", "1,3,x,320"],
     "--input-shape '1,3,x,320': expected [NAME=]D,D,... with integers"),
    (["--calibration", "{imgs}", "-o", "{out}", "--input-shape", "1,3,320,320", "--budget", "2"],
     "budget must be in [0, 1], got 2.0"),
]


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS, ids=[m for _, m in CLI_ERRORS])
def test_cli_usage_errors(
    yolov8n_path: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *,
    args: list[str], message: str,
) -> None:
    argv = [a.format(imgs=photo_dir, out=tmp_path / "o.onnx") for a in args]
    assert main(["quantize", str(yolov8n_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"edgeguard: {message}"


def test_float_tflite_is_refused_as_not_quantized(blazeface_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "face.tflite"
    assert main(["quantize", str(blazeface_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TFLite model is not int8-quantized" in err and "TFLite converter" in err
    assert not out.exists()


def test_int8_tflite_is_accepted_as_it_is(okay_nabu_path: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A real pre-quantized model (full int8 wake-word detector) passes through unchanged."""
    out = tmp_path / "okay_nabu.tflite"
    assert main(["quantize", str(okay_nabu_path), "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.read_bytes() == okay_nabu_path.read_bytes()
