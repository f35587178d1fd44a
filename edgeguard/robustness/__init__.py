"""Publisher side: how robust is a classifier to black-box adversarial inputs, and how well does its
feature-squeezing detector (``edgeguard.engine.adversarial``) catch them (``edgeguard robustness``).

Never imported by the device runtime.
"""

from __future__ import annotations

from ._attacks import SpsaConfig, fgsm, margin, pgd, spsa_gradient
from ._digits import DIGITS_META, Digits, load_digits, mlp_onnx, train_digits_mlp
from ._evaluate import AttackRow, RobustnessReport, evaluate, probe_manifest
from ._plot import plot_report

__all__ = [
    "SpsaConfig", "fgsm", "pgd", "margin", "spsa_gradient",
    "DIGITS_META", "Digits", "load_digits", "mlp_onnx", "train_digits_mlp",
    "AttackRow", "RobustnessReport", "evaluate", "probe_manifest", "plot_report",
]
