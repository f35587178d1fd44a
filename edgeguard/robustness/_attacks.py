"""Black-box attacks that need only forward passes: FGSM and PGD on an SPSA gradient estimate.

SPSA (Spall 1992; used as an attack by Uesato et al., ICML 2018): the gradient of a loss ``L`` at ``x`` is
estimated from ``q`` random Rademacher directions ``d`` as ``mean((L(x + c d) - L(x - c d)) / (2 c) * d)``.
All ``2 q`` probes of every sample go to the model as one batch. The loss is the margin
``log p_y - max_{j != y} log p_j``: it is negative exactly when the model is wrong, and the attacks step to
lower it inside the L-infinity ball of radius ``eps`` around the clean input (clipped to the valid range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Classifier", "SpsaConfig", "margin", "spsa_gradient", "fgsm", "pgd"]

Classifier = Callable[[np.ndarray], np.ndarray]  # a batch of inputs -> class probabilities [N, C]


@dataclass(frozen=True, kw_only=True)
class SpsaConfig:
    samples: int = 32  # Rademacher directions per estimate (2x forward passes each)
    delta: float = 0.01  # finite-difference step
    max_batch: int = 8192  # rows per model call
    low: float = 0.0
    high: float = 1.0


def _predict(model: Classifier, x: np.ndarray, max_batch: int) -> np.ndarray:
    if len(x) <= max_batch:
        return np.asarray(model(x))
    return np.concatenate([model(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])


def margin(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log p_y - max_{j != y} log p_j`` per row (negative: misclassified)."""
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None))
    rows = np.arange(len(y))
    true = logp[rows, y]
    other = logp.copy()
    other[rows, y] = -np.inf
    return np.asarray(true - other.max(axis=1))


def spsa_gradient(model: Classifier, x: np.ndarray, y: np.ndarray, cfg: SpsaConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """SPSA estimate of d margin / dx for every sample of ``x`` ([N, ...])."""
    n, q = len(x), cfg.samples
    d = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, q, *x.shape[1:]))
    probes = np.concatenate([x[:, None] + cfg.delta * d, x[:, None] - cfg.delta * d], axis=1)
    probs = _predict(model, probes.reshape(n * 2 * q, *x.shape[1:]).astype(np.float32), cfg.max_batch)
    losses = margin(probs, np.repeat(y, 2 * q)).reshape(n, 2, q)
    diff = (losses[:, 0] - losses[:, 1]) / (2 * cfg.delta)  # [n, q]
    return np.asarray(np.einsum("nq,nq...->n...", diff, d) / q)


def fgsm(model: Classifier, x: np.ndarray, y: np.ndarray, eps: float, *, cfg: SpsaConfig,
         rng: np.random.Generator) -> np.ndarray:
    """One signed step of size ``eps`` down the estimated margin gradient."""
    grad = spsa_gradient(model, x, y, cfg, rng)
    return np.asarray(np.clip(x - eps * np.sign(grad), cfg.low, cfg.high), dtype=np.float32)


def pgd(model: Classifier, x: np.ndarray, y: np.ndarray, eps: float, *, cfg: SpsaConfig,
        rng: np.random.Generator, steps: int = 10, step_size: float | None = None) -> np.ndarray:
    """``steps`` projected signed steps (size ``2.5 eps / steps`` unless given); a sample stops moving once it
    is misclassified (the smallest change that fools the model is the one a detector must catch)."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    adv = x.copy()
    active = np.ones(len(x), dtype=bool)
    for _ in range(steps):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        grad = spsa_gradient(model, adv[idx], y[idx], cfg, rng)
        step = adv[idx] - alpha * np.sign(grad)
        step = np.clip(np.clip(step, x[idx] - eps, x[idx] + eps), cfg.low, cfg.high)
        adv[idx] = step.astype(np.float32)
        fooled = margin(_predict(model, adv[idx], cfg.max_batch), y[idx]) < 0
        active[idx[fooled]] = False
    return np.asarray(adv)
