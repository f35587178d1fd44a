"""`edgeguard infer` and `edgeguard doctor` on real sealed bundles (real keys, pack and open)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeguard.cli import main

from .models import conv_model


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, yolov8n_path: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    assert main(["keygen", "publisher", "--out", str(d / "pub")]) == 0
    assert main(["keygen", "device", "--out", str(d / "dev")]) == 0
    (d / "conv.onnx").write_bytes(conv_model())
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    np.savez(d / "golden.npz", **{"0/in/x": x})
    meta = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 32, 32], "range": [0.0, 1.0]}]}
    (d / "meta.json").write_text(json.dumps(meta))
    common = ["--sign-key", str(d / "pub/publisher.key"), "--recipient", str(d / "dev/device.pub")]
    assert main(["pack", str(d / "conv.onnx"), "--name", "conv", "--version", "1", *common, "--golden",
                 str(d / "golden.npz"), "--meta", str(d / "meta.json"), "-o", str(d / "conv.egm")]) == 0
    yolo_meta = {
        "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 320, 320], "range": [0.0, 1.0]}],
        "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 22, 2100]}],
        "preprocess": {"size": [320, 320], "layout": "NCHW"},
        "postprocess": {"kind": "yolov8", "conf": 0.25},
    }
    (d / "yolo.json").write_text(json.dumps(yolo_meta))
    assert main(["pack", str(yolov8n_path), "--name", "yolo", "--version", "2", *common, "--meta",
                 str(d / "yolo.json"), "-o", str(d / "yolo.egm")]) == 0
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x)
    np.save(d / "bad_shape.npy", np.zeros((1, 3, 8, 8), np.float32))
    (d / "junk.npy").write_bytes(b"not numpy")
    (d / "input.txt").write_text("hello")
    return {"dir": d, "conv": d / "conv.egm", "yolo": d / "yolo.egm", "trust": d / "pub/publisher.pub",
            "key": d / "dev/device.key"}


def _infer(s: dict[str, Path], bundle: str, inp: Path, *extra: str) -> list[str]:
    return ["infer", "--bundle", str(s[bundle]), "--trust", str(s["trust"]), "--device-key", str(s["key"]),
            "--profile", "generic-x86_64", *extra, str(inp)]


@pytest.mark.parametrize("name", ["x.npy", "x.npz"])
def test_infer_tensor_file_json(sealed: dict[str, Path], name: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer(sealed, "conv", sealed["dir"] / name, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "onnxruntime" and doc["accelerator"] == "cpu"
    assert doc["outputs"]["y"]["shape"] == [1, 8, 32, 32]


def test_infer_image_with_postprocessing(sealed: dict[str, Path], astronaut_png: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer(sealed, "yolo", astronaut_png, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["post"]["kind"] == "detections" and "outputs" not in doc


def test_infer_table_output(sealed: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer(sealed, "conv", sealed["dir"] / "x.npy")) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "[1, 8, 32, 32]" in out and "float32" in out


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("bad_shape.npy", "shape"),
        ("junk.npy", "not a valid .npy file"),
        ("input.txt", "unknown input type .txt"),
        ("missing.npy", "cannot read input"),
    ],
)
def test_bad_input_exits_2_with_one_line(sealed: dict[str, Path], name: str, fragment: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer(sealed, "conv", sealed["dir"] / name)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_image_for_a_tensor_model_exits_2(sealed: dict[str, Path], astronaut_png: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_infer(sealed, "conv", astronaut_png)) == 2
    assert "declares no image preprocessing" in capsys.readouterr().err


def test_untrusted_bundle_exits_3(sealed: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "publisher", "--out", str(tmp_path)]) == 0
    args = ["infer", "--bundle", str(sealed["conv"]), "--trust", str(tmp_path / "publisher.pub"),
            "--device-key", str(sealed["key"]), "--profile", "generic-x86_64", str(sealed["dir"] / "x.npy")]
    assert main(args) == 3
    assert "untrusted signer" in capsys.readouterr().err


def test_infer_commits_the_rollback_floor_only_after_loading(sealed: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert main(_infer(sealed, "conv", sealed["dir"] / "x.npy", "--state", str(state), "--json")) == 0
    assert any(state.iterdir())


def test_unknown_profile_exits_2(sealed: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = _infer(sealed, "conv", sealed["dir"] / "x.npy")
    args[args.index("generic-x86_64")] = "raspbery-pi-4"
    assert main(args) == 2
    assert "unknown device profile 'raspbery-pi-4'" in capsys.readouterr().err


def test_doctor_on_a_fake_jetson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    # --root reads the board facts from the fake tree; arch is this machine's, so force the match by name.
    assert main(["doctor", "--root", str(tmp_path), "--profile", "jetson-orin", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"] == "jetson-orin" and doc["profile_source"] == "chosen with --profile"
    assert doc["board"]["device_tree_model"].startswith("NVIDIA Jetson Orin")
    onnx = {a["label"]: a for a in doc["accelerators"]["onnx"]}
    assert onnx["tensorrt-int8"]["present"] is False and "TensorrtExecutionProvider" in onnx["tensorrt-int8"][
        "reason"]
    assert onnx["cpu"]["present"] is True
    gpu = doc["accelerators"]["tflite"][0]
    assert gpu["kind"] == "gpu" and gpu["present"] is False and "not loadable" in gpu["reason"]


def test_doctor_with_a_bundle_explains_the_choice(sealed: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["doctor", "--bundle", str(sealed["conv"]), "--trust", str(sealed["trust"]), "--device-key",
            str(sealed["key"])]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile_source"] == "detected"
    model = doc["model"]
    assert model["accelerator"] == "cpu"
    skipped = [c for c in model["candidates"] if c["status"] == "skipped"]
    assert skipped and all(c["reason"].startswith("absent:") for c in skipped)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "runs on cpu" in out and "profile" in out


def test_doctor_bundle_needs_keys(sealed: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--bundle", str(sealed["conv"])]) == 2
    assert "--bundle needs --trust" in capsys.readouterr().err


def test_bench_smoke_runs_and_reports_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    # Only that the benchmark runs end to end and reports its ratios: timing thresholds never go into tests.
    assert main(["bench", "--quick", "--only", "blazeface", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (result,) = doc["results"]
    assert result["model"] == "blazeface" and result["throughput"]["ratio"] > 0
    assert result["cold_start"]["ratio_without_selftest"] > 0 and result["cold_start"]["selftest_ms"] > 0
