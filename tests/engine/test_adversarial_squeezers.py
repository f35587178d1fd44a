"""An explicit squeezer set in ``defence.adversarial.squeezers`` (edgeguard/engine/adversarial.py): each
squeezer's distance divided by its clean-calibration scale, the score the largest of them. On the real digits
classifier through the engine (real onnxruntime): the score is what the formula says, the set that
`edgeguard robustness digits --search` chose meets issue 12's goal with the false-positive rate measured on
the held-out test split, old declarations open and score as before, and bad lists make the bundle
malformed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from edgeguard.engine.adversarial import parse_defence
from edgeguard.engine.squeeze import reduce_bit_depth
from edgeguard.errors import BundleRejected
from tests.engine.test_adversarial import _crafted, _engine
from tests.support.digits import SEARCHED, digits_case, probs


def _flag_rate(defence: dict[str, Any], x: np.ndarray) -> tuple[float, list[float]]:
    case = digits_case()
    with _engine(case, defence) as engine:
        results = [engine.infer({"x": x[i:i + 1]}) for i in range(len(x))]
    return (sum(bool(r.adversarial) for r in results) / len(results),
            [float(r.adversarial_score or 0.0) for r in results])


def _l1(case: Any, x: np.ndarray, bits: int) -> np.ndarray:
    return np.abs(probs(case, reduce_bit_depth(x, bits, low=0.0, high=1.0)).astype(np.float64)
                  - probs(case, x).astype(np.float64)).sum(axis=1)


def test_scales_are_clean_median_distances_and_the_score_is_the_largest_normalised_one() -> None:
    case = digits_case()
    decl = case.defence("flag", 0.05, squeezers=SEARCHED)["adversarial"]
    assert "bits" not in decl and "median" not in decl and "joint" not in decl
    assert [next(iter(s)) for s in decl["squeezers"]] == ["bits", "bits"]
    for item, (_, bits) in zip(decl["squeezers"], SEARCHED, strict=True):
        assert item["bits"] == bits
        assert item["scale"] == pytest.approx(float(np.median(_l1(case, case.calibration.x, bits))), rel=1e-3)
    x = case.test.x[:12]
    pairs = list(zip(SEARCHED, decl["squeezers"], strict=True))
    want = np.max([_l1(case, x, b) / s["scale"] for (_, b), s in pairs], axis=0)
    _, got = _flag_rate({"adversarial": decl}, x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # The conformal quantile of the normalised calibration scores: just under 5 % of them lie above it.
    cal = np.max([_l1(case, case.calibration.x, b) / s["scale"] for (_, b), s in pairs], axis=0)
    above = int((cal > decl["threshold"]).sum())
    assert above == len(cal) - math.ceil((len(cal) + 1) * 0.95)


@pytest.mark.parametrize("fpr", [0.04, 0.05])
def test_searched_set_false_positive_rate_on_held_out_clean_data(fpr: float) -> None:
    case = digits_case()
    rate, _ = _flag_rate(case.defence("flag", fpr, squeezers=SEARCHED), case.test.x)
    slack = 3 * math.sqrt(fpr * (1 - fpr) / len(case.test.y))
    assert fpr / 4 <= rate <= fpr + slack, rate


def test_searched_set_meets_the_goal_where_the_single_bit_depth_does_not() -> None:
    """Issue 12's goal at the eps where PGD halves accuracy (0.12): >= 80 % of the successful attacks
    detected while the false-positive rate *measured on the held-out test split* stays <= 5 %. Calibrated
    for 4 % (the margin for a 359-sample calibration), the searched set does; bits 3 alone does not."""
    case = digits_case()
    _, adv = _crafted(case, n=150, eps=0.12)
    new = case.defence("flag", 0.04, squeezers=SEARCHED)
    old = case.defence("flag", 0.04)
    new_fpr, _ = _flag_rate(new, case.test.x)
    new_det, _ = _flag_rate(new, adv)
    old_fpr, _ = _flag_rate(old, case.test.x)
    old_det, _ = _flag_rate(old, adv)
    print(f"searched: fpr {new_fpr:.3f} detection {new_det:.3f}; bits 3: fpr {old_fpr:.3f} detection "
          f"{old_det:.3f} on {len(adv)} successful attacks")
    assert new_fpr <= 0.05 and new_det >= 0.8, (new_fpr, new_det)
    assert new_det > old_det and new_fpr <= old_fpr, (new_fpr, new_det, old_fpr, old_det)


def test_batched_normalised_score_is_one_call_and_matches_separate_calls() -> None:
    case = digits_case()
    decl = case.defence("flag", 0.05, squeezers=SEARCHED)["adversarial"]
    scores = []
    for batched in (True, False):
        calls: list[int] = []
        with _engine(case, {"adversarial": {**decl, "batched": batched}}) as engine:
            real = engine._fast.run

            def counting(inputs: Any, real: Any = real, calls: list[int] = calls) -> Any:
                calls.append(int(next(iter(inputs.values())).shape[0]))
                return real(inputs)

            engine._fast.run = counting  # type: ignore[method-assign]
            scores.append(engine.infer({"x": case.test.x[7:8]}).adversarial_score)
        assert calls == ([3] if batched else [1, 1, 1])
    assert scores[0] == pytest.approx(scores[1], rel=1e-4)


def test_an_old_declaration_opens_and_scores_the_plain_largest_distance() -> None:
    case = digits_case()
    # As main's `pack --adversarial` wrote it (docs/security.md), no squeezers key.
    old = {"mode": "flag", "threshold": 0.0841, "fpr": 0.05, "bits": 3, "median": 0, "joint": False,
           "softmax": False, "input": "x", "batched": True, "calibrated_on": 359}
    with _engine(case, {"adversarial": old}) as engine:
        spec = parse_defence(engine.manifest)
        got = engine.infer({"x": case.test.x[3:4]}).adversarial_score
    assert spec is not None and spec.listed == () and "squeezers" not in spec.to_json()
    assert got == pytest.approx(float(_l1(case, case.test.x[3:4], 3)[0]), abs=1e-5)


_LISTED = {"mode": "flag", "threshold": 50.0, "fpr": 0.05,
           "squeezers": [{"bits": 4, "scale": 0.01}, {"median": 2, "scale": 0.1}]}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"squeezers": []}, "empty"),
        ({"squeezers": [{"bits": b, "scale": 0.1} for b in range(1, 6)]}, "at most 4"),
        ({"squeezers": "bits4"}, "squeezers"),
        ({"squeezers": [{"bits": 4}]}, "scale"),
        ({"squeezers": [{"bits": 4, "scale": 0.0}]}, "scale"),
        ({"squeezers": [{"bits": 4, "median": 2, "scale": 0.1}]}, "exactly one"),
        ({"squeezers": [{"bits": 17, "scale": 0.1}]}, "bits"),
        ({"squeezers": [{"median": 1, "scale": 0.1}]}, "median"),
        ({"squeezers": [{"bits": 4, "scale": 0.1}, {"bits": 4, "scale": 0.2}]}, "repeats"),
        ({"squeezers": [{"bits": 4, "scale": 0.1, "colour": 1}]}, "colour"),
        ({"squeezers": [7]}, "squeezers[0]"),
        ({"bits": 3}, "cannot be combined"),
        ({"joint": True}, "cannot be combined"),
        ({"threshold": 201.0}, "threshold"),  # over 2 / the smallest scale: no score can reach it
    ],
)
def test_bad_squeezer_lists_make_the_bundle_malformed(change: dict[str, Any], says: str) -> None:
    with pytest.raises(BundleRejected) as info:
        _engine(digits_case(), {"adversarial": {**_LISTED, **change}})
    assert info.value.check == "malformed" and "defence" in str(info.value) and says in str(info.value)
    assert "\n" not in str(info.value)
