"""Choose a model's squeezer set at calibration time, on the calibration split only (``robustness --search``).

Candidates: every set of one to ``max_squeezers`` squeezers out of bit depths 1-5 and (for an image input)
2x2 and 3x3 medians, scored as the largest normalised distance (``defence.adversarial.squeezers``). The
calibration inputs are attacked (PGD, the same SPSA attack as the report, at every eps of the report) and each
candidate is rated by the detection rate of those successful attacks at its own conformal threshold on the
clean calibration inputs. The held-out test split is never read: the report's false-positive and detection
figures stay out-of-sample. Ties go to fewer squeezers (cost), then to the order of ``candidates``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from edgeguard.engine.adversarial import MIN_SCALE, AdversarialSpec, Squeezer, SqueezerKind, squeeze_distances

from ._attacks import SpsaConfig, pgd

__all__ = ["SearchResult", "candidate_squeezers", "search_squeezers"]

RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class SearchResult:
    squeezers: tuple[tuple[SqueezerKind, int], ...]
    calibration_detection: float  # mean over eps of the detected share of successful attacks on calibration
    tried: int


def candidate_squeezers(spec: AdversarialSpec) -> list[tuple[SqueezerKind, int]]:
    out: list[tuple[SqueezerKind, int]] = [("bits", b) for b in range(1, 6)]
    if spec.spatial is not None:
        out += [("median", 2), ("median", 3)]
    return out


def _distances(run: RunFn, x: np.ndarray, spec: AdversarialSpec, sq: tuple[SqueezerKind, int]) -> np.ndarray:
    one = replace(spec, listed=(Squeezer(sq[0], sq[1]),), bits=0, median=0, joint=False, batched=False)
    return np.concatenate([squeeze_distances(run, {spec.input: x[i:i + 256]}, one)[1][0]
                           for i in range(0, len(x), 256)])


def search_squeezers(
    run: RunFn,
    classify: Callable[[np.ndarray], np.ndarray],
    spec: AdversarialSpec,
    calibration: tuple[np.ndarray, np.ndarray],
    *,
    eps: Sequence[float],
    fpr: float,
    cfg: SpsaConfig,
    rng: np.random.Generator,
    pgd_steps: int = 10,
    max_squeezers: int = 2,
    candidates: Sequence[tuple[SqueezerKind, int]] | None = None,
) -> SearchResult:
    """The candidate set that detects most successful PGD attacks on ``calibration`` at ``fpr``."""
    x, y = calibration
    pool = list(candidates) if candidates is not None else candidate_squeezers(spec)
    correct = classify(x).argmax(axis=1) == y
    attacked = []
    for e in eps:
        adv = pgd(classify, x, y, e, cfg=cfg, rng=rng, steps=pgd_steps)
        success = correct & (classify(adv).argmax(axis=1) != y)
        if success.any():
            attacked.append(adv[success])
    clean = {sq: _distances(run, x, spec, sq) for sq in pool}
    scales = {sq: max(float(np.median(d)), MIN_SCALE) for sq, d in clean.items()}
    adv_d = [{sq: _distances(run, a, spec, sq) for sq in pool} for a in attacked]
    rank = math.ceil((len(x) + 1) * (1.0 - fpr))
    best: tuple[float, int, int] | None = None
    best_set: tuple[tuple[SqueezerKind, int], ...] = (pool[0],)
    tried = 0
    for size in range(1, max_squeezers + 1):
        for order, combo in enumerate(itertools.combinations(pool, size)):
            tried += 1
            score = np.max([clean[s] / scales[s] for s in combo], axis=0)
            threshold = np.sort(score)[min(rank, len(score)) - 1]
            rates = [float((np.max([d[s] / scales[s] for s in combo], axis=0) > threshold).mean())
                     for d in adv_d]
            key = (float(np.mean(rates)) if rates else 0.0, -size, -order)
            if best is None or key > best:
                best, best_set = key, combo
    return SearchResult(best_set, best[0] if best is not None else 0.0, tried)
