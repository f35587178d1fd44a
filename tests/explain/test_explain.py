"""Explanations on real zoo models: the heat concentrates on the box that decides YOLOv8n's answer on the
astronaut photo, through a model file and through a sealed bundle; bounded passes; bad inputs in one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeguard.cli import main
from edgeguard.engine.preprocess import ImageLimits, decode_image
from edgeguard.explain import backend_runner, draft_manifest, explain, plan_grid
from edgeguard.fingerprint import load_model

META = Path(__file__).resolve().parents[2] / "examples" / "yolov8n-meta.json"


def _inside_outside(heat: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float]:
    x1, y1, x2, y2 = (round(v) for v in box)
    inside = np.zeros(heat.shape, bool)
    inside[y1:y2, x1:x2] = True
    return float(heat[inside].mean()), float(heat[~inside].mean())


@pytest.fixture(scope="module")
def astronaut(astronaut_png: Path) -> np.ndarray:
    return decode_image(astronaut_png.read_bytes(), limits=ImageLimits())


def _explain_model(model_path: Path, image: np.ndarray, *, batch: int, max_passes: int = 101) -> object:
    meta = json.loads(META.read_text())
    with load_model(model_path, shapes={"images": (1, 3, 320, 320)}) as model:
        runner = backend_runner(model.backend, draft_manifest(meta, "onnx"))
        assert runner.stack  # YOLOv8n takes a batch axis: occluded copies run as one batch
        return explain(image, prepare=runner.prepare, run=runner.run, post=runner.post, order=runner.order,
                       max_passes=max_passes, batch=batch)


def test_heat_concentrates_on_the_face_box(yolov8n_path: Path, astronaut: np.ndarray) -> None:
    result = _explain_model(yolov8n_path, astronaut, batch=8)
    target = result.target  # type: ignore[attr-defined]
    assert target.kind == "box" and target.label == "FACE_FEMALE"
    inside, outside = _inside_outside(result.heatmap.heat, target.original_box)  # type: ignore[attr-defined]
    assert inside > 4.0 * outside, (inside, outside)
    assert result.heatmap.passes <= 101  # type: ignore[attr-defined]


def test_batches_give_the_same_heat_as_single_passes(yolov8n_path: Path, astronaut: np.ndarray) -> None:
    small = astronaut[::4, ::4].copy()  # 128 x 128: few passes
    one = _explain_model(yolov8n_path, small, batch=1, max_passes=26)
    many = _explain_model(yolov8n_path, small, batch=7, max_passes=26)
    np.testing.assert_allclose(one.heatmap.heat, many.heatmap.heat, atol=1e-4)  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 600), st.integers(2, 2000))
def test_passes_never_exceed_the_cap(height: int, width: int, window: int, cap: int) -> None:
    size, stride = plan_grid(height, width, window=window, max_passes=cap)
    rows = 1 if height <= size else -(-(height - size) // stride) + 1
    cols = 1 if width <= size else -(-(width - size) // stride) + 1
    assert 1 + rows * cols <= max(cap, 2)
    assert stride >= 1 and 1 <= size <= max(height, width)


def test_cli_model_path_writes_the_overlay(yolov8n_path: Path, astronaut_png: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "heat.png"
    assert main(["explain", "--model", str(yolov8n_path), "--meta", str(META), str(astronaut_png), "-o",
                 str(out), "--max-passes", "50", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["label"] == "FACE_FEMALE" and summary["passes"] <= 50
    grid = np.array(summary["grid"])
    assert grid.shape == (16, 16) and grid.max() == 1.0
    with Image.open(io.BytesIO(out.read_bytes())) as png:
        assert png.format == "PNG" and png.size == (512, 512)


def test_cli_bundle_path_explains_through_the_engine(yolov8n_path: Path, astronaut_png: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", "publisher", "--out", str(keys)]) == 0
    assert main(["keygen", "device", "--out", str(keys)]) == 0
    bundle = tmp_path / "y.egm"
    assert main(["pack", str(yolov8n_path), "--name", "yolo", "--version", "1", "--sign-key",
                 str(keys / "publisher.key"), "--recipient", str(keys / "device.pub"), "--meta", str(META),
                 "-o", str(bundle)]) == 0
    capsys.readouterr()
    out = tmp_path / "heat.png"
    assert main(["explain", "--bundle", str(bundle), "--trust", str(keys / "publisher.pub"), "--device-key",
                 str(keys / "device.key"), str(astronaut_png), "-o", str(out), "--max-passes", "65",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["label"] == "FACE_FEMALE"
    x1, y1, x2, y2 = summary["target"]["box"]
    grid = np.array(summary["grid"])  # 16 x 16 cells of 32 px over the 512 px photo
    cells = np.zeros(grid.shape, bool)
    cells[int(y1 // 32):int(-(-y2 // 32)), int(x1 // 32):int(-(-x2 // 32))] = True
    assert grid[cells].mean() > 3.0 * grid[~cells].mean()
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-passes", "1"], "--max-passes"),
        (["--batch", "0"], "--batch"),
        (["--window", "0"], "--window"),
    ],
)
def test_cli_refuses_bad_options(  # noqa: PLR0917 - fixtures and table columns
    yolov8n_path: Path, astronaut_png: Path, tmp_path: Path, argv: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["explain", "--model", str(yolov8n_path), "--meta", str(META), str(astronaut_png), "-o",
                 str(tmp_path / "h.png"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_refuses_bad_inputs_in_one_line(yolov8n_path: Path, astronaut_png: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    bad_meta = tmp_path / "meta.json"
    bad_meta.write_text("{not json")
    out = str(tmp_path / "h.png")
    model = ["--model", str(yolov8n_path)]
    cases = [
        ([*model, "--meta", str(META), str(corrupt), "-o", out], "corrupt.png"),
        ([*model, "--meta", str(bad_meta), str(astronaut_png), "-o", out], "not JSON"),
        ([*model, str(astronaut_png), "-o", out], "--model needs --meta"),
        ([str(astronaut_png), "-o", out], "give either --bundle"),
        ([*model, "--bundle", "b.egm", "--meta", str(META), str(astronaut_png), "-o", out], "give either"),
        (["--bundle", "b.egm", str(astronaut_png), "-o", out], "--bundle needs --trust"),
        ([*model, "--meta", str(META), str(astronaut_png), "-o", str(tmp_path / "no" / "h.png")],
         "does not exist"),
    ]
    for argv, message in cases:
        assert main(["explain", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not Path(out).exists()
