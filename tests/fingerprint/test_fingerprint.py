"""Ownership proof on real zoo models: the owner's model and its derived copies match its trigger set,
unrelated models do not; ``edgeguard fingerprint`` exit codes and one-line refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from edgeguard.cli import main
from edgeguard.fingerprint import TriggerSet, compare, load_model, load_trigger, make_trigger, save_trigger

from ._derive import derived_copy

YOLO_SHAPE = {"images": (1, 3, 320, 320)}


@pytest.fixture(scope="module")
def yolo_trigger(yolov8n_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp") / "trigger.npz"
    with load_model(yolov8n_path, shapes=YOLO_SHAPE) as model:
        save_trigger(path, make_trigger(model, count=24))
    return path


def _verify(model: Path, trigger: Path, *extra: str) -> int:
    return main(["fingerprint", "verify", str(model), "--trigger", str(trigger),
                 "--input-shape", "images=1,3,320,320", *extra])


def test_trigger_file_is_private_and_round_trips(yolo_trigger: Path) -> None:
    assert stat.S_IMODE(yolo_trigger.stat().st_mode) == 0o600
    trigger = load_trigger(yolo_trigger)
    assert trigger.count == 24 and trigger.names == ("images",)
    assert trigger.inputs[0].shape == (24, 1, 3, 320, 320)


def test_owner_and_derived_copies_match(yolov8n_path: Path, yolo_trigger: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(yolov8n_path, yolo_trigger) == 0
    assert "match: 24/24" in capsys.readouterr().out
    for noise in (0.01, 0.05):  # small changes to every weight, as fine-tuning or tampering makes
        copy = derived_copy(yolov8n_path, tmp_path / f"noised-{noise}.onnx", noise=noise)
        with load_model(copy, shapes=YOLO_SHAPE) as model:
            result = compare(model, load_trigger(yolo_trigger))
        assert result.ok and result.rate >= 0.9, result


def test_int8_copy_from_the_quantizer_matches(yolov8n_path: Path, yolo_trigger: Path, tmp_path: Path) -> None:
    from edgeguard import zoo
    from edgeguard.quantize import QuantizeOptions, quantize_onnx

    photos = tmp_path / "photos"
    photos.mkdir()
    for key in ("astronaut.png", "coffee.png", "chelsea.png", "text.png"):
        (photos / key).write_bytes(zoo.fetch(key).read_bytes())
    int8 = tmp_path / "yolov8n-int8.onnx"
    report = quantize_onnx(yolov8n_path, photos, int8, options=QuantizeOptions(
        bench_runs=3, min_speedup=0.01, input_shapes=YOLO_SHAPE))
    assert not report.kept_fp32, report.reason
    assert _verify(int8, yolo_trigger) == 0


def test_unrelated_models_do_not_match(  # noqa: PLR0917 - one fixture per model
    yolov8n_path: Path, ppocr_det_path: Path, blazeface_path: Path, yolo_trigger: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    trigger = load_trigger(yolo_trigger)
    for seed in (1, 2):  # same architecture and weight statistics, none of the learned function
        other = derived_copy(yolov8n_path, tmp_path / f"permuted-{seed}.onnx", permute=True, seed=seed)
        with load_model(other, shapes=YOLO_SHAPE) as model:
            result = compare(model, trigger)
        assert not result.ok and result.rate <= 0.2, result
    # Other detectors of the zoo: another ONNX detector that takes the same images, a TFLite face detector.
    assert main(["fingerprint", "verify", str(ppocr_det_path), "--trigger", str(yolo_trigger),
                 "--input-shape", "x=1,3,320,320"]) == 1
    assert "no match" in capsys.readouterr().out
    assert main(["fingerprint", "verify", str(blazeface_path), "--trigger", str(yolo_trigger)]) == 1
    assert "no match: inputs differ" in capsys.readouterr().out


def test_tflite_model_is_fingerprinted_through_its_backend(blazeface_path: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ai_edge_litert")
    trigger = tmp_path / "face.npz"
    assert main(["fingerprint", "make", str(blazeface_path), "--out", str(trigger), "--count", "16",
                 "--range=-1,1"]) == 0
    assert main(["fingerprint", "verify", str(blazeface_path), "--trigger", str(trigger), "--json"]) == 0
    assert '"match": true' in capsys.readouterr().out


def test_each_trigger_set_is_drawn_afresh(blazeface_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    with load_model(blazeface_path) as model:  # no seed: from the OS, so a trigger set cannot be predicted
        first, second = (make_trigger(model, count=4, ranges={"input": (-1.0, 1.0)}) for _ in range(2))
    assert not np.array_equal(first.inputs[0], second.inputs[0])
    assert not np.array_equal(first.index, second.index) or first.index.size == first.output_size


def test_threshold_option_decides(yolov8n_path: Path, yolo_trigger: Path, tmp_path: Path) -> None:
    # 20 % weight noise ruins the detector: it answers at most a few triggers like the owner's model.
    wrecked = derived_copy(yolov8n_path, tmp_path / "wrecked.onnx", noise=0.2)
    assert _verify(wrecked, yolo_trigger) == 1
    assert _verify(yolov8n_path, yolo_trigger, "--threshold", "1.0") == 0


# --- bad inputs: one line, exit 2 --------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _small_trigger(**change: object) -> TriggerSet:
    rng = np.random.default_rng(0)
    fields: dict[str, object] = {
        "names": ("images",), "inputs": (rng.random((4, 1, 3, 8, 8)).astype(np.float32),),
        "expected": rng.random((4, 32)).astype(np.float32), "index": np.arange(32, dtype=np.int64),
        "output_size": 32, "threshold": 0.75,
    }
    fields.update(change)
    return TriggerSet(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("corrupt", lambda p: _write_private(p, b"PK\x03\x04 not really a zip"), "not an .npz archive"),
        ("empty", lambda p: _write_private(p, b""), "not an .npz archive"),
        ("wrong-shape", lambda p: save_trigger(p, _small_trigger(expected=np.zeros((4,), np.float32))),
         "'expected' must be a float32 matrix"),
        ("one-trigger", lambda p: save_trigger(p, _small_trigger(expected=np.zeros((1, 32), np.float32))),
         "1 triggers of 32 values"),
        ("index-outside", lambda p: save_trigger(p, _small_trigger(index=np.arange(32, dtype=np.int64) + 5)),
         "'index' points outside"),
        ("nan", lambda p: save_trigger(p, _small_trigger(expected=np.full((4, 32), np.nan, np.float32))),
         "NaN"),
        ("inputs-count", lambda p: save_trigger(p, _small_trigger(inputs=(np.zeros((3, 1, 3, 8, 8)),))),
         "4 numeric values expected"),
    ],
)
def test_bad_trigger_files_are_refused_in_one_line(  # noqa: PLR0917 - fixtures and table columns
    yolov8n_path: Path, tmp_path: Path, name: str, make: object, message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.npz"
    make(path)  # type: ignore[operator]
    assert _verify(yolov8n_path, path) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_pickled_arrays_are_refused(yolov8n_path: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pickle.npz"
    arrays = {"version": np.array(1), "names": np.array(["images"]), "expected": np.zeros((4, 4), np.float32),
              "index": np.arange(4), "meta": np.array([4.0, 0.5]), "input0": np.array([object()] * 4)}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    path.chmod(0o600)
    assert _verify(yolov8n_path, path) == 2
    assert "unreadable array" in capsys.readouterr().err


def test_inflating_members_are_refused_before_loading(tmp_path: Path) -> None:
    # 400 MB of zeros compress to a few hundred kB: the declared sizes are checked before anything inflates.
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, version=np.array(1), expected=np.zeros((100_000, 1000), np.float32))
    path.chmod(0o600)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(Exception, match="would take more than"):
        load_trigger(path)


def test_oversized_unexpected_and_open_files_are_refused(yolo_trigger: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="larger than the limit of 1000 bytes"):
        load_trigger(yolo_trigger, limit=1000)
    extra = tmp_path / "extra.npz"
    np.savez(extra, version=np.array(1), payload=np.zeros(3))
    extra.chmod(0o600)
    with pytest.raises(Exception, match="unexpected members"):
        load_trigger(extra)
    readable = tmp_path / "readable.npz"
    readable.write_bytes(yolo_trigger.read_bytes())
    readable.chmod(0o644)
    with pytest.raises(Exception, match="too open"):
        load_trigger(readable)
    link = tmp_path / "link.npz"
    link.symlink_to(yolo_trigger)
    with pytest.raises(Exception, match="link"):
        load_trigger(link)


def test_make_refuses_bad_arguments(yolov8n_path: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "t.npz")
    cases = [
        ([str(yolov8n_path), "--out", out], "dynamic axes"),
        ([str(yolov8n_path), "--out", out, "--input-shape", "images=1,3,x"], "--input-shape"),
        ([str(yolov8n_path), "--out", out, "--input-shape", "images=1,3,320,320", "--count", "1"], "--count"),
        ([str(yolov8n_path), "--out", out, "--input-shape", "images=1,3,320,320", "--range", "1,0"],
         "--range"),
        ([str(yolov8n_path), "--out", str(tmp_path / "no" / "t.npz"), "--input-shape", "images=1,3,320,320"],
         "does not exist"),
        ([str(tmp_path / "missing.onnx"), "--out", out], "missing.onnx"),
    ]
    for argv, message in cases:
        assert main(["fingerprint", "make", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not Path(out).exists()
