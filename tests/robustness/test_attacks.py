"""The black-box attacks of `edgeguard robustness` (edgeguard/robustness/_attacks.py) on models whose true
gradient is known, the detector's report arithmetic, and the real data sets the command builds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeguard import zoo
from edgeguard.robustness import AttackRow, RobustnessReport, SpsaConfig, fgsm, margin, pgd, spsa_gradient
from edgeguard.robustness._textlines import text_lines


def _linear(w: np.ndarray) -> tuple[object, np.ndarray]:
    """A softmax-linear 2-class model on flat inputs: margin(x, y=0) = (w0 - w1) . x exactly."""
    def model(x: np.ndarray) -> np.ndarray:
        logits = x.reshape(len(x), -1) @ w.T
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return model, w[0] - w[1]


def test_spsa_estimates_the_true_gradient_of_the_margin() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 16)).astype(np.float64)
    model, grad = _linear(w)
    x = rng.uniform(0.2, 0.8, (4, 16)).astype(np.float32)
    est = spsa_gradient(model, x, np.zeros(4, np.int64), SpsaConfig(samples=512, delta=0.01), rng)
    for row in est:
        cos = float(row @ grad / np.linalg.norm(row) / np.linalg.norm(grad))
        assert cos > 0.9, cos
        assert np.mean(np.sign(row) == np.sign(grad)) > 0.8


def test_fgsm_and_pgd_stay_in_the_ball_and_the_range_and_lower_the_margin() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 16))
    model, _ = _linear(w)
    x = rng.uniform(0.0, 1.0, (8, 16)).astype(np.float32)
    y = model(x).argmax(axis=1)
    cfg = SpsaConfig(samples=64)
    for adv in (fgsm(model, x, y, 0.1, cfg=cfg, rng=rng),
                pgd(model, x, y, 0.1, cfg=cfg, rng=rng, steps=5)):
        assert adv.dtype == np.float32 and adv.shape == x.shape
        assert np.abs(adv - x).max() <= 0.1 + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        assert np.all(margin(model(adv), y) <= margin(model(x), y) + 1e-9)


def test_pgd_stops_moving_an_input_once_it_is_fooled() -> None:
    w = np.array([[1.0, 0.0], [0.0, 1.0]])  # class 0 iff x0 > x1
    model, _ = _linear(w)
    x = np.array([[0.52, 0.5], [0.9, 0.1]], np.float32)
    adv = pgd(model, x, np.zeros(2, np.int64), 0.2, cfg=SpsaConfig(samples=64),
              rng=np.random.default_rng(2), steps=10)
    assert model(adv[:1]).argmax() == 1  # the close one is fooled ...
    assert np.abs(adv[0] - x[0]).max() < 0.2  # ... with less than the whole budget
    assert model(adv[1:]).argmax() == 0  # 0.8 apart: eps 0.2 cannot flip it


def test_goal_is_judged_at_the_first_eps_where_accuracy_halves() -> None:
    report = RobustnessReport(model="m", test_samples=100, calibration_samples=100, clean_accuracy=0.9,
                              target_fpr=0.05, threshold=0.1, clean_fpr=0.04, squeezers={}, spsa={})
    report.rows = [AttackRow("pgd", 0.1, 0.6, 30, 29, 29 / 30), AttackRow("pgd", 0.2, 0.44, 46, 37, 37 / 46),
                   AttackRow("pgd", 0.3, 0.1, 80, 10, 0.125)]
    goal = report.goal("pgd")
    assert goal["eps"] == 0.2 and goal["met"] is True  # 0.804 >= 0.8 and 0.04 <= 0.05
    report.clean_fpr = 0.06
    assert report.goal("pgd")["met"] is False
    assert report.goal("fgsm") == {"attack": "fgsm", "eps": None, "detection_rate": None,
                                   "clean_fpr": 0.06, "met": False}


def test_text_lines_are_a_real_task_the_zoo_classifier_solves() -> None:
    x, y = text_lines()
    assert x.shape[1:] == (3, 48, 192) and x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    assert len(y) >= 80 and set(np.unique(y)) == {0, 1} and (y == 1).sum() == (y == 0).sum()
    session = ort.InferenceSession(str(zoo.fetch("ppocr-cls")), providers=["CPUExecutionProvider"])
    accuracy = float((session.run(None, {"x": x})[0].argmax(axis=1) == y).mean())
    assert accuracy > 0.9, accuracy
