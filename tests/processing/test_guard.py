"""InputGuard: every bad input is refused with its exact message, counted, and the guard keeps serving."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.engine.guard import REJECTION_CHECKS, GuardLimits, InputGuard
from edgeguard.errors import InputRejected

from ._manifests import manifest

MANIFEST = manifest((
    TensorSpec("images", "float32", (1, 3, 8, 8), (0.0, 1.0)),
    TensorSpec("mask", "uint8", (None, 4), (0, 1)),
))


def good() -> dict[str, Any]:
    return {"images": np.zeros((1, 3, 8, 8), np.float32), "mask": np.ones((2, 4), np.uint8)}


def with_(**changes: Any) -> dict[str, Any]:
    inputs = good()
    inputs.update(changes)
    return inputs


def images_with(index: tuple[int, ...], value: float) -> np.ndarray:
    arr = np.zeros((1, 3, 8, 8), np.float32)
    arr[index] = value
    return arr


def two_bad_values() -> np.ndarray:
    arr = images_with((0, 0, 0, 1), np.nan)
    arr[0, 1, 2, 3] = np.inf
    return arr


BAD = [
    ("missing", {"images": good()["images"]}, "name",
     "missing input 'mask' (expected: images, mask)"),
    ("unknown", with_(extra=np.zeros(1)), "name",
     "unknown input 'extra' (expected: images, mask)"),
    ("not an array", with_(images=[[0.0]]), "type",
     "input 'images': expected a numpy array, got list"),
    ("wrong dtype", with_(images=np.zeros((1, 3, 8, 8), np.float64)), "dtype",
     "input 'images': dtype float64 does not match float32"),
    ("wrong rank", with_(images=np.zeros((1, 3, 8), np.float32)), "shape",
     "input 'images': shape (1, 3, 8) does not match [1, 3, 8, 8]"),
    ("wrong fixed axis", with_(images=np.zeros((1, 3, 8, 9), np.float32)), "shape",
     "input 'images': shape (1, 3, 8, 9) does not match [1, 3, 8, 8]"),
    ("wrong axis of a dynamic shape", with_(mask=np.zeros((2, 5), np.uint8)), "shape",
     "input 'mask': shape (2, 5) does not match [?, 4]"),
    ("empty dynamic axis", with_(mask=np.zeros((0, 4), np.uint8)), "shape",
     "input 'mask': shape (0, 4) has an empty axis 0"),
    ("dynamic axis over its limit", with_(mask=np.zeros((20000, 4), np.uint8)), "shape",
     "input 'mask': shape (20000, 4): dynamic axis 0 is 20000, over the limit of 16384"),
    ("NaN and Inf", with_(images=two_bad_values()), "finite",
     "input 'images': 1 NaN and 1 Inf values (first at index (0, 0, 0, 1))"),
    ("float above range", with_(images=images_with((0, 2, 3, 4), 1.5)), "range",
     "input 'images': 1 values outside the declared range [0, 1] (min 0, max 1.5, first at index "
     "(0, 2, 3, 4))"),
    ("float below range", with_(images=images_with((0, 0, 7, 7), -0.25)), "range",
     "input 'images': 1 values outside the declared range [0, 1] (min -0.25, max 0, first at index "
     "(0, 0, 7, 7))"),
    ("integer outside range", with_(mask=np.array([[0, 1, 0, 1], [0, 2, 0, 0]], np.uint8)), "range",
     "input 'mask': 1 values outside the declared range [0, 1] (min 0, max 2, first at index (1, 1))"),
]


@pytest.mark.parametrize(("case", "inputs", "check", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_exact_message(case: str, inputs: Any, check: str, message: str) -> None:
    guard = InputGuard(MANIFEST)
    with pytest.raises(InputRejected) as err:
        guard.check(inputs)
    assert str(err.value) == message
    assert guard.rejections()[check] == 1
    assert guard.rejected == 1
    # The guard keeps serving: the next good request passes.
    out = guard.check(good())
    assert set(out) == {"images", "mask"}
    assert guard.accepted == 1


def test_not_a_mapping() -> None:
    guard = InputGuard(MANIFEST)
    with pytest.raises(InputRejected, match=r"^inputs must be a mapping of name to array, got list$"):
        guard.check([1, 2])  # type: ignore[arg-type]
    assert guard.rejections()["type"] == 1


def test_total_size_limit_is_checked_before_values() -> None:
    guard = InputGuard(MANIFEST, limits=GuardLimits(max_total_bytes=800))
    # 768 bytes of images + 40 bytes of mask; the NaN is never scanned because the size check comes first.
    inputs = with_(images=images_with((0, 0, 0, 0), np.nan), mask=np.zeros((10, 4), np.uint8))
    with pytest.raises(InputRejected) as err:
        guard.check(inputs)
    assert str(err.value) == "inputs total 808 bytes, over the limit of 800 bytes"
    assert guard.rejections() == {**dict.fromkeys(REJECTION_CHECKS, 0), "size": 1}


def test_accepts_valid_input_and_returns_contiguous_arrays() -> None:
    guard = InputGuard(MANIFEST)
    strided = np.zeros((1, 3, 8, 16), np.float32)[..., ::2]
    assert not strided.flags["C_CONTIGUOUS"]
    out = guard.check(with_(images=strided))
    assert out["images"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out["images"], strided)
    assert list(out) == ["images", "mask"]
    assert guard.rejected == 0


def test_non_finite_allowed_when_configured() -> None:
    spec = manifest((TensorSpec("x", "float32", (2,)),))
    guard = InputGuard(spec, limits=GuardLimits(allow_non_finite=True))
    guard.check({"x": np.array([np.nan, np.inf], np.float32)})


def test_rejections_made_before_the_guard_are_counted_with_the_others() -> None:
    guard = InputGuard(MANIFEST)
    guard.note_rejected("image")
    guard.note_rejected("ood")
    assert guard.rejected == 2
    assert guard.rejections()["image"] == 1 and guard.rejections()["ood"] == 1
    with pytest.raises(ValueError, match="unknown rejection check 'decode'"):
        guard.note_rejected("decode")


def test_limits_are_bounded() -> None:
    with pytest.raises(ValueError, match="max_total_bytes"):
        GuardLimits(max_total_bytes=0)
    with pytest.raises(ValueError, match="max_dynamic_axis"):
        GuardLimits(max_dynamic_axis=0)


def test_ppocr_det_dynamic_input(ppocr_det_path: Any) -> None:
    """PP-OCR det takes x [?, 3, ?, ?]: a sensible size passes, a wrong layout or a huge one does not."""
    import onnxruntime as ort

    spec = manifest((TensorSpec("x", "float32", (None, 3, None, None)),),
                    (TensorSpec("sigmoid_0.tmp_0", "float32", (None, 1, None, None)),))
    guard = InputGuard(spec, limits=GuardLimits(max_total_bytes=16 * 1024 * 1024))
    session = ort.InferenceSession(str(ppocr_det_path), providers=["CPUExecutionProvider"])
    ok = guard.check({"x": np.zeros((1, 3, 96, 320), np.float32)})
    (out,) = session.run(None, ok)
    assert out.shape == (1, 1, 96, 320)
    with pytest.raises(InputRejected) as err:
        guard.check({"x": np.zeros((1, 96, 320, 3), np.float32)})
    assert str(err.value) == "input 'x': shape (1, 96, 320, 3) does not match [?, 3, ?, ?]"
    with pytest.raises(InputRejected) as err:
        guard.check({"x": np.zeros((1, 3, 2048, 2048), np.float32)})
    assert str(err.value) == "inputs total 50331648 bytes, over the limit of 16777216 bytes"
