"""The digits classifier the adversarial-input tests share: real data (the CSV inside the scikit-learn wheel,
through the zoo), a small MLP trained once per test process (seeded: the same weights every run), its
ONNX bytes, disjoint train / calibration / test splits and a calibrated ``defence`` declaration."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeguard.engine.adversarial import SqueezerKind
from edgeguard.robustness import DIGITS_META, Digits, load_digits, mlp_onnx, train_digits_mlp
from edgeguard.robustness._calibrate import adversarial_defence

BITS = 3  # the squeezers `edgeguard robustness` measured best on 8x8 digits (docs/security.md)
MEDIAN = 0
SEARCHED: tuple[tuple[SqueezerKind, int], ...] = (("bits", 4), ("bits", 5))  # `robustness digits --search`


@dataclass(frozen=True)
class DigitsCase:
    model: bytes
    train: Digits
    calibration: Digits
    test: Digits

    def session(self) -> Any:
        return ort.InferenceSession(self.model, providers=["CPUExecutionProvider"])

    def defence(self, mode: str = "flag", fpr: float = 0.05,
                squeezers: Sequence[tuple[SqueezerKind, int]] | None = None) -> dict[str, Any]:
        """Calibrated on the calibration split; ``squeezers``: an explicit set (normalised score)."""
        samples = [{"x": self.calibration.x[i:i + 1]} for i in range(len(self.calibration.y))]
        return adversarial_defence(self.model, "onnx", meta=DIGITS_META, samples=samples,
                                   mode=mode,  # type: ignore[arg-type]
                                   fpr=fpr, bits=BITS, median=MEDIAN, squeezers=squeezers)

    def meta(self, mode: str = "flag", fpr: float = 0.05) -> dict[str, Any]:
        return {**DIGITS_META, "defence": self.defence(mode, fpr)}


@functools.lru_cache(maxsize=1)
def digits_case() -> DigitsCase:
    data = load_digits()
    train, cal, test = data.split(0.6, 0.2, 0.2, seed=0)
    return DigitsCase(mlp_onnx(train_digits_mlp(train, seed=0)), train, cal, test)


def probs(case: DigitsCase, x: np.ndarray) -> np.ndarray:
    return np.asarray(case.session().run(None, {"x": x.astype(np.float32)})[0])
