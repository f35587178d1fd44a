"""The feature-squeezing adversarial-input detector (edgeguard/engine/adversarial.py) on a real classifier:
an MLP trained on the real digits data set, run by real onnxruntime through the engine. Squeezers against
brute force, calibration against held-out clean data, a crafted (black-box PGD) input flagged, flag and
reject modes, nothing run when off, and bad declarations refused as a malformed bundle."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle._pack import _tensor_from_meta
from edgeguard.engine import Engine
from edgeguard.engine.adversarial import parse_defence
from edgeguard.engine.squeeze import median_smooth, reduce_bit_depth
from edgeguard.errors import AdversarialInput, BundleRejected
from edgeguard.profiles import get_profile
from edgeguard.robustness import DIGITS_META, SpsaConfig, pgd
from tests.engine.support import HOST_PROFILE, PlainSource, golden_from, manifest_for
from tests.support.digits import DigitsCase, digits_case, probs


def _engine(case: DigitsCase, defence: dict[str, Any] | None) -> Engine:
    inputs = [_tensor_from_meta(t, "inputs") for t in DIGITS_META["inputs"]]
    outputs = [_tensor_from_meta(t, "outputs") for t in DIGITS_META["outputs"]]
    manifest = manifest_for("onnx", "digits", inputs, outputs, postprocess=DIGITS_META["postprocess"],
                            defence=defence)
    golden = golden_from("onnx", case.model, {"x": case.test.x[:1]})
    return Engine.load(PlainSource(manifest, bytearray(case.model), [golden]),
                       profile=get_profile(HOST_PROFILE))


# -- squeezers -------------------------------------------------------------------------------------------


def test_bit_depth_keeps_exactly_two_to_the_bits_levels() -> None:
    x = np.linspace(-1.0, 3.0, 1001, dtype=np.float32).reshape(1, 1, 7, 143)
    out = reduce_bit_depth(x, 2, low=0.0, high=2.0)
    assert out.shape == x.shape and out.dtype == np.float32
    assert sorted(set(np.round(out.ravel(), 6).tolist())) == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0])
    assert np.abs(reduce_bit_depth(x, 16, low=-1, high=3) - x).max() < 1e-4


@pytest.mark.parametrize(("window", "axes"), [(2, (2, 3)), (3, (2, 3)), (3, (1, 2))])
def test_median_matches_a_brute_force_filter(window: int, axes: tuple[int, int]) -> None:
    x = np.random.default_rng(window).random((2, 3, 6, 5), dtype=np.float32)
    got = median_smooth(x, window, axes=axes)
    before = (window - 1) // 2
    a0, a1 = axes
    padded = np.pad(x, [(before, window // 2) if a in axes else (0, 0) for a in range(4)], mode="edge")
    want = np.empty_like(x)
    for idx in itertools.product(*(range(s) for s in x.shape)):
        sl = [slice(i, i + 1) for i in idx]
        sl[a0] = slice(idx[a0], idx[a0] + window)
        sl[a1] = slice(idx[a1], idx[a1] + window)
        want[idx] = np.median(padded[tuple(sl)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# -- calibration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr", [0.05, 0.1])
def test_calibration_hits_its_false_positive_rate_on_held_out_clean_data(fpr: float) -> None:
    case = digits_case()
    decl = case.defence("flag", fpr)["adversarial"]
    assert decl["calibrated_on"] == len(case.calibration.y)
    with _engine(case, {"adversarial": decl}) as engine:
        flagged = [engine.infer({"x": case.test.x[i:i + 1]}).adversarial for i in range(len(case.test.y))]
    rate = sum(bool(f) for f in flagged) / len(flagged)
    # The conformal threshold promises <= fpr in expectation; three binomial standard deviations of slack.
    slack = 3 * math.sqrt(fpr * (1 - fpr) / len(flagged))
    assert rate <= fpr + slack, (rate, fpr, slack)
    assert rate >= fpr / 4, f"threshold far too loose for the target: {rate}"  # it is calibrated, not 2.0


def test_too_few_clean_samples_for_the_target_rate_is_refused() -> None:
    case = digits_case()
    from edgeguard.errors import ConfigError
    from edgeguard.robustness._calibrate import adversarial_defence

    with pytest.raises(ConfigError, match="at least 19 clean samples"):
        adversarial_defence(case.model, "onnx", meta=DIGITS_META, samples=[{"x": case.test.x[:1]}] * 10,
                            mode="flag", fpr=0.05, bits=3, median=0)


# -- crafted inputs, flag and reject ------------------------------------------------------------------------


def _crafted(case: DigitsCase, n: int = 60, eps: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Black-box PGD (SPSA gradients, forward passes only): the inputs it turned from right to wrong."""
    x, y = case.test.x[:n], case.test.y[:n]
    adv = pgd(lambda b: probs(case, b), x, y, eps, cfg=SpsaConfig(samples=32),
              rng=np.random.default_rng(1), steps=10)
    ok = (probs(case, x).argmax(1) == y) & (probs(case, adv).argmax(1) != y)
    assert ok.sum() >= 10, "the attack should succeed on some inputs at this eps"
    return x[ok], adv[ok]


def test_a_crafted_adversarial_input_is_flagged_and_its_clean_original_is_not() -> None:
    case = digits_case()
    clean, adv = _crafted(case)
    with _engine(case, case.defence("flag")) as engine:
        on_adv = [engine.infer({"x": a[None]}) for a in adv]
        on_clean = [engine.infer({"x": c[None]}) for c in clean]
        health = engine.health()["adversarial"]
    assert all(r.adversarial_score is not None and 0.0 <= r.adversarial_score <= 2.0 for r in on_adv)
    assert sum(bool(r.adversarial) for r in on_adv) >= 0.75 * len(adv), [r.adversarial_score for r in on_adv]
    assert sum(bool(r.adversarial) for r in on_clean) <= 0.2 * len(clean)
    doc = on_adv[0].to_json()
    assert set(doc) >= {"adversarial_score", "adversarial", "post"}
    assert health["mode"] == "flag" and health["checked"] == 2 * len(adv) and health["rejected"] == 0
    assert health["flagged"] == sum(bool(r.adversarial) for r in on_adv + on_clean)


def test_reject_mode_refuses_the_crafted_input_and_keeps_serving() -> None:
    case = digits_case()
    clean, adv = _crafted(case)
    with _engine(case, case.defence("reject")) as engine:
        refused = 0
        for a in adv:
            try:
                engine.infer({"x": a[None]})
            except AdversarialInput as exc:
                refused += 1
                assert "looks adversarial" in str(exc) and "\n" not in str(exc)
                assert exc.score > exc.threshold
            engine.infer({"x": case.test.x[-1:]})  # a clean input right after is served
        health = engine.health()
    assert refused >= 0.75 * len(adv)
    assert health["adversarial"]["rejected"] == refused == health["rejections"]["adversarial"]
    assert health["inferences"] == len(adv) - refused + len(adv)
    assert len(clean) == len(adv)


def test_off_means_no_detector_runs_and_no_fields() -> None:
    case = digits_case()
    calls: list[int] = []
    with _engine(case, None) as engine:
        real = engine._fast.run

        def counting(inputs: Any) -> Any:
            calls.append(int(next(iter(inputs.values())).shape[0]))
            return real(inputs)

        engine._fast.run = counting  # type: ignore[method-assign]
        doc = engine.infer({"x": case.test.x[:1]}).to_json()
        assert engine.health()["adversarial"] == {"mode": "off", "checked": 0, "flagged": 0, "rejected": 0}
    assert calls == [1], "one plain run of batch 1 when the detector is off"
    assert "adversarial" not in doc and "adversarial_score" not in doc


def test_on_and_batched_is_one_call_with_the_same_score_as_separate_calls() -> None:
    case = digits_case()
    decl = case.defence("flag")["adversarial"]
    results = []
    for batched in (True, False):
        calls: list[int] = []
        with _engine(case, {"adversarial": {**decl, "batched": batched}}) as engine:
            real = engine._fast.run

            def counting(inputs: Any, real: Any = real, calls: list[int] = calls) -> Any:
                calls.append(int(next(iter(inputs.values())).shape[0]))
                return real(inputs)

            engine._fast.run = counting  # type: ignore[method-assign]
            results.append((engine.infer({"x": case.test.x[5:6]}), calls))
    (together, c1), (apart, c2) = results
    assert c1 == [2] and c2 == [1, 1]  # one squeezer (bits): batch 2 in one call, or two calls
    assert together.adversarial_score == pytest.approx(apart.adversarial_score, abs=1e-5)
    np.testing.assert_allclose(together.outputs["probs"], apart.outputs["probs"], rtol=1e-5, atol=1e-6)


# -- bad declarations ---------------------------------------------------------------------------------------

_GOOD = {"mode": "flag", "threshold": 0.1, "fpr": 0.05, "bits": 3, "median": 0}


@pytest.mark.parametrize(
    ("defence", "says"),
    [
        ({"adversarial": {**_GOOD, "mode": "block"}}, "mode"),
        ({"adversarial": {**_GOOD, "threshold": -0.1}}, "threshold"),
        ({"adversarial": {**_GOOD, "threshold": 2.5}}, "threshold"),
        ({"adversarial": {**_GOOD, "threshold": "0.1"}}, "threshold"),
        ({"adversarial": {**_GOOD, "fpr": 0.9}}, "fpr"),
        ({"adversarial": {k: v for k, v in _GOOD.items() if k != "threshold"}}, "threshold"),
        ({"adversarial": {**_GOOD, "bits": 0, "median": 0}}, "no squeezer"),
        ({"adversarial": {**_GOOD, "median": 1}}, "median"),
        ({"adversarial": {**_GOOD, "bits": 17}}, "bits"),
        ({"adversarial": {**_GOOD, "input": "pixels"}}, "input"),
        ({"adversarial": {**_GOOD, "output": "logits"}}, "output"),
        ({"adversarial": {**_GOOD, "range": [1.0, 0.0]}}, "range"),
        ({"adversarial": {**_GOOD, "spatial": [2, 2]}}, "spatial"),
        ({"adversarial": {**_GOOD, "colour": True}}, "colour"),
        ({"adversarial": "on"}, "adversarial"),
        ({"adversarial": _GOOD, "watermark": {}}, "watermark"),
    ],
)
def test_bad_declarations_make_the_bundle_malformed(defence: dict[str, Any], says: str) -> None:
    case = digits_case()
    with pytest.raises(BundleRejected) as info:
        _engine(case, defence)
    assert info.value.check == "malformed" and "defence" in str(info.value) and says in str(info.value)


def test_an_output_that_is_not_batch_first_is_refused() -> None:
    from edgeguard.bundle.manifest import TensorSpec
    from edgeguard.errors import ConfigError

    m = manifest_for("onnx", "odd", [TensorSpec("x", "float32", (1, 1, 8, 8), (0.0, 1.0))],
                     [TensorSpec("p", "float32", (10, 2))], defence={"adversarial": _GOOD})
    with pytest.raises(ConfigError, match="batch-first"):
        parse_defence(m)


def test_integer_inputs_cannot_be_squeezed() -> None:
    from edgeguard.bundle.manifest import TensorSpec
    from edgeguard.errors import ConfigError

    m = manifest_for("onnx", "ints", [TensorSpec("x", "int32", (1, 1, 8, 8))],
                     [TensorSpec("p", "float32", (1, 2))], defence={"adversarial": _GOOD})
    with pytest.raises(ConfigError, match="floating-point"):
        parse_defence(m)


def test_all_bit_depths_at_once_equal_one_depth_at_a_time() -> None:
    from edgeguard.engine.squeeze import reduce_bit_depths

    x = np.random.default_rng(3).uniform(-1.5, 2.5, (2, 3, 5, 7)).astype(np.float32)
    x[0, 0, 0, :3] = [-1.0, 1.0, 0.5]  # the range's ends and a tie for rounding
    got = reduce_bit_depths(x, (1, 4, 5, 16), low=-1.0, high=1.0)
    want = np.stack([reduce_bit_depth(x, b, low=-1.0, high=1.0) for b in (1, 4, 5, 16)])
    assert got.dtype == np.float32 and got.shape == (4, *x.shape)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="bits"):
        reduce_bit_depths(x, (0, 4), low=0.0, high=1.0)
    with pytest.raises(ValueError, match="empty"):
        reduce_bit_depths(x, (4,), low=1.0, high=1.0)
