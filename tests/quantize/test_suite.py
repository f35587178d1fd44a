"""`edgeguard quantize` on real models from PyPI wheels it was not built with (the suite of
tools/quantize_anchor.py): each ends with an int8 model or an honest "kept fp32", exit 0, never a traceback.

YOLOv8n and PP-OCR det, the models the quantizer was built with, are covered by test_end_to_end.py. The
speed comparison with raw onnxruntime is the tool's job (timings on a shared machine do not make tests);
here the outcomes and the accuracy side are asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edgeguard import zoo
from edgeguard.cli import main

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "quantize_anchor.py"


def _anchor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quantize_anchor", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quantize_anchor", module)
    spec.loader.exec_module(module)
    return module


ANCHOR = _anchor()
UNSEEN = ("magika", "ppocr-rec", "ppocr-cls", "silero-vad")


def _run(key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, object], str]:
    model = ANCHOR.SUITE[key]
    calibration = model.calibration(tmp_path)
    out, report = tmp_path / f"{key}.onnx", tmp_path / f"{key}.json"
    argv = ["quantize", str(zoo.fetch(key)), "--calibration", str(calibration), "-o", str(out),
            "--samples", "12", "--bench-runs", "3", "--report", str(report)]
    for name, shape in model.input_shapes.items():
        argv += ["--input-shape", f"{name}={','.join(map(str, shape))}"]
    if model.preprocess is not None:
        (tmp_path / "pre.json").write_text(json.dumps(model.preprocess))
        argv += ["--preprocess", str(tmp_path / "pre.json")]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err + captured.out
    data = json.loads(report.read_text())
    assert out.is_file()
    if data["kept_fp32"]:
        assert data["reason"].startswith("kept fp32: ")
        assert out.read_bytes() == zoo.fetch(key).read_bytes()
    else:
        assert data["chosen"] in {c["name"] for c in data["candidates"] if c["passes"]}
        assert f"wrote the int8 model to {out}" in captured.out
    return data, captured.out


@pytest.mark.slow
@pytest.mark.parametrize("key", UNSEEN)
def test_unseen_model_ends_with_a_model_or_kept_fp32(key: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data, printed = _run(key, tmp_path, capsys)
    candidates = {c["name"]: c for c in data["candidates"]}
    assert "choice: " in printed
    if key == "magika":
        # int32 byte input: the ids are fed as they are; quantizing only the compute layers keeps top-1
        # agreement on every held-out file (whole-model QDQ does not: the guard refuses it).
        assert data["input_shapes"] == {"bytes": [1, 2048]}
        assert candidates["int8-compute-only"]["passes"]
        assert not candidates["int8"]["passes"]
    if key == "ppocr-rec":
        # The dynamic width came from the calibration .npz; CTC output judged by edit distance.
        assert data["input_shapes"] == {"x": [1, 3, 48, 320]}
        assert data["kinds"] == ["sequence"]
    if key == "silero-vad":
        assert data["input_shapes"]["sr"] == []  # the int64 scalar input, fed as it is
    # Every candidate either built and was measured, or failed with its one-line reason.
    assert all(c["error"] or c["latency_ms"] for c in candidates.values())
