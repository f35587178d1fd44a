"""Making and checking a fingerprint: forward passes only, on any model the engine's backends open.

**Make.** Draw a pool of secret random inputs (smooth blobs and noise over each input's range), run the
model on each and on a slightly perturbed copy, and keep the inputs whose answers are both *stable* (the
perturbed copy answers alike: quantization or small weight changes keep the answer) and *distinctive* (unlike
the answer to every other input in the pool). The trigger set stores the inputs and the model's outputs.

**Compare.** Outputs are compared after standardizing each output position across the trigger set, with
each model's own statistics: what every model of an architecture answers alike (a detector's anchor grid, a
bias) cancels, and what is left is how *this* model's answers move from one secret input to the next. Trigger
``i`` matches when the suspect's answer to it correlates best with the owner's answer to ``i`` (of all
triggers) and by at least ``MIN_CORRELATION``. A model that does not derive from the owner's matches a
trigger by chance with probability about ``1/n``; ``chance`` says how likely the observed rate is by luck.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeguard.errors import BackendError

from ._model import InputSpec, LoadedModel
from ._trigger import TriggerSet

__all__ = ["Match", "compare", "make_trigger", "outputs_vector", "DEFAULT_COUNT", "DEFAULT_THRESHOLD"]

DEFAULT_COUNT = 32
DEFAULT_THRESHOLD = 0.75
MIN_CORRELATION = 0.5
MAX_VALUES = 4096  # expected values kept per trigger
MIN_VALUES = 16  # fewer varying output values: compare top-1 labels instead of correlations
POOL_FACTOR = 3  # candidates drawn per trigger kept
PERTURB = 0.02  # perturbation for the stability check, as a fraction of the input range

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Match:
    rate: float
    matched: int
    count: int
    median_correlation: float
    threshold: float
    chance: float  # probability of matching at least this many triggers by chance (binomial, p = 1/n)
    reason: str = ""  # why nothing could be compared (incompatible inputs or outputs), else ""

    @property
    def ok(self) -> bool:
        return not self.reason and self.rate >= self.threshold

    def to_json(self) -> dict[str, object]:
        return {
            "match": self.ok, "rate": round(self.rate, 4), "matched": self.matched, "triggers": self.count,
            "threshold": self.threshold, "median_correlation": None if math.isnan(self.median_correlation)
            else round(self.median_correlation, 4),
            "chance": self.chance, **({"reason": self.reason} if self.reason else {}),
        }


def outputs_vector(outputs: dict[str, np.ndarray], order: Sequence[str]) -> np.ndarray:
    """Every output flattened into one float64 vector, in the model's declared output order."""
    return np.concatenate([np.asarray(outputs[name], dtype=np.float64).ravel() for name in order])


def _range(spec: InputSpec, given: tuple[float, float] | None) -> tuple[float, float]:
    if given is not None:
        return given
    kind = spec.dtype.kind
    if kind == "f":
        return (0.0, 1.0)
    if kind == "b":
        return (0.0, 1.0)
    if spec.dtype.itemsize == 1:
        info = np.iinfo(spec.dtype)
        return (float(info.min), float(info.max))
    return (0.0, 255.0)


def _candidate(rng: np.random.Generator, spec: InputSpec, lo: float, hi: float) -> np.ndarray:
    """A smooth random pattern (blobs at a random scale) mixed with fine noise, within [lo, hi]."""
    factor = int(rng.choice([1, 4, 8, 16, 32]))
    coarse_shape = tuple(max(1, -(-d // factor)) if d > 8 else d for d in spec.shape)
    coarse = rng.random(coarse_shape)
    for axis, (d, c) in enumerate(zip(spec.shape, coarse_shape, strict=True)):
        if c != d:
            coarse = np.repeat(coarse, -(-d // c), axis=axis)
    coarse = coarse[tuple(slice(0, d) for d in spec.shape)]
    mix = float(rng.uniform(0.0, 0.5))
    unit = (1.0 - mix) * coarse + mix * rng.random(spec.shape)
    return _to_dtype(lo + unit * (hi - lo), spec)


def _to_dtype(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    if spec.dtype.kind == "f":
        return values.astype(spec.dtype)
    out: np.ndarray = values >= 0.5 if spec.dtype.kind == "b" else np.rint(values).astype(spec.dtype)
    return out


def _perturbed(rng: np.random.Generator, x: np.ndarray, spec: InputSpec, lo: float, hi: float) -> np.ndarray:
    noisy = x.astype(np.float64) + rng.normal(0.0, PERTURB * (hi - lo), x.shape)
    return _to_dtype(np.clip(noisy, lo, hi), spec)


def _standardize(rows: np.ndarray, columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Columns to mean 0 / std 1 (constant ones dropped unless ``columns`` fixes them), rows to unit norm."""
    std = rows.std(axis=0)
    keep = std > 1e-9 * max(float(std.max()), 1e-30) if columns is None else columns
    safe = np.where(std > 0, std, 1.0)
    z = ((rows - rows.mean(axis=0)) / safe)[:, keep]
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norms > 0, norms, 1.0), keep


def make_trigger(
    model: LoadedModel,
    *,
    count: int = DEFAULT_COUNT,
    threshold: float = DEFAULT_THRESHOLD,
    ranges: dict[str, tuple[float, float]] | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> TriggerSet:
    """Choose ``count`` stable, distinctive inputs for ``model`` (``seed`` None: from the OS, secret)."""
    if not 2 <= count <= 1024:
        raise ValueError("count must be within 2..1024")
    rng = np.random.default_rng(seed)
    order = [o.name for o in model.backend.outputs]
    bounds = {s.name: _range(s, (ranges or {}).get(s.name)) for s in model.inputs}
    pool = POOL_FACTOR * count
    say = progress or (lambda _done, _total: None)
    candidates: list[dict[str, np.ndarray]] = []
    answers: list[np.ndarray] = []
    again: list[np.ndarray] = []
    for k in range(pool):
        x = {s.name: _candidate(rng, s, *bounds[s.name]) for s in model.inputs}
        xp = {s.name: _perturbed(rng, x[s.name], s, *bounds[s.name]) for s in model.inputs}
        candidates.append(x)
        answers.append(outputs_vector(model.run(x), order))
        again.append(outputs_vector(model.run(xp), order))
        say(k + 1, pool)
    table = np.stack(answers)
    varying = np.flatnonzero(table.std(axis=0) > 0)
    if varying.size < 2:
        raise ValueError("the model's outputs do not vary with its inputs: nothing to fingerprint")
    index = np.sort(rng.choice(varying, size=min(MAX_VALUES, varying.size), replace=False))
    if index.size < MIN_VALUES:
        chosen = _by_label(table[:, index], np.stack(again)[:, index], count)
        return _trigger(model, candidates, table, index=index, chosen=chosen, threshold=threshold)
    z, keep = _standardize(table[:, index])
    # Perturbed answers in the pool's frame (its statistics), so stability means "stays where it was".
    mean, std = table[:, index].mean(axis=0), table[:, index].std(axis=0)
    zp = ((np.stack(again)[:, index] - mean) / np.where(std > 0, std, 1.0))[:, keep]
    zp /= np.maximum(np.linalg.norm(zp, axis=1, keepdims=True), 1e-30)
    stability = np.sum(z * zp, axis=1)
    similar = z @ z.T
    np.fill_diagonal(similar, -1.0)
    score = stability - similar.max(axis=1)
    chosen = np.sort(np.argsort(-score)[:count])
    return _trigger(model, candidates, table, index=index, chosen=chosen, threshold=threshold)


def _trigger(model: LoadedModel, candidates: list[dict[str, np.ndarray]], table: np.ndarray, *,
             index: np.ndarray, chosen: np.ndarray, threshold: float) -> TriggerSet:
    names = tuple(s.name for s in model.inputs)
    inputs = tuple(np.stack([candidates[i][n] for i in chosen]) for n in names)
    expected = table[chosen][:, index].astype(np.float32)
    return TriggerSet(names, inputs, expected, index.astype(np.int64), table.shape[1], threshold)


def _by_label(values: np.ndarray, again: np.ndarray, count: int) -> np.ndarray:
    """Candidates whose top-1 survives the perturbation, largest margin first, class by class in turn."""
    labels = values.argmax(axis=1)
    ordered = np.sort(values, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    stable = np.flatnonzero(again.argmax(axis=1) == labels)
    queues = [list(stable[labels[stable] == c][np.argsort(-margin[stable[labels[stable] == c]])])
              for c in np.unique(labels[stable])]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    if len(chosen) < 2:
        raise ValueError("no input keeps its top-1 answer under a small perturbation: nothing to fingerprint")
    picked: np.ndarray = np.sort(np.array(chosen))
    return picked


def compare(model: LoadedModel, trigger: TriggerSet, *, threshold: float | None = None,
            progress: Progress | None = None) -> Match:
    """Run ``model`` on the triggers and measure how many it answers like the owner's model."""
    limit = trigger.threshold if threshold is None else threshold
    n = trigger.count
    specs = {s.name: s for s in model.inputs}
    if len(specs) == 1 and len(trigger.names) == 1:
        # One input each: fed by position, since a copy may well rename it.
        specs = {trigger.names[0]: model.inputs[0]}
    for name, values in zip(trigger.names, trigger.inputs, strict=True):
        spec = specs.get(name)
        if spec is None or tuple(values.shape[1:]) != spec.shape or len(specs) != len(trigger.names):
            return Match(0.0, 0, n, 0.0, limit, 1.0, reason=f"inputs differ (the trigger feeds {name!r} "
                         f"{tuple(values.shape[1:])}; the model takes "
                         f"{', '.join(f'{s.name} {s.shape}' for s in model.inputs)})")
    order = [o.name for o in model.backend.outputs]
    say = progress or (lambda _done, _total: None)
    rows: list[np.ndarray] = []
    for i in range(n):
        feed = {specs[name].name: values[i].astype(specs[name].dtype)
                for name, values in zip(trigger.names, trigger.inputs, strict=True)}
        try:
            vector = outputs_vector(model.run(feed), order)
        except BackendError as exc:  # a model that cannot even run the triggers is not the owner's
            return Match(0.0, 0, n, 0.0, limit, 1.0, reason=f"the model cannot run the triggers ({exc})")
        if vector.size != trigger.output_size:
            return Match(0.0, 0, n, 0.0, limit, 1.0,
                         reason=f"outputs differ ({vector.size} values; the owner's model gives "
                         f"{trigger.output_size})")
        rows.append(vector[trigger.index])
        say(i + 1, n)
    answers = np.nan_to_num(np.stack(rows))
    if trigger.index.size < MIN_VALUES:
        owner_labels = trigger.expected.argmax(axis=1)
        agree = owner_labels == answers.argmax(axis=1)
        shares = np.bincount(owner_labels, minlength=trigger.index.size) / n
        luck = max(1.0 / trigger.index.size, float(shares.max()))
        matched = int(agree.sum())
        return Match(matched / n, matched, n, float("nan"), limit, _chance(matched, n, luck))
    owner, keep = _standardize(trigger.expected.astype(np.float64))
    suspect, _ = _standardize(answers, keep)
    corr = owner @ suspect.T
    diagonal = np.diag(corr)
    hits = (corr.argmax(axis=1) == np.arange(n)) & (diagonal >= MIN_CORRELATION)
    matched = int(hits.sum())
    return Match(matched / n, matched, n, float(np.median(diagonal)), limit, _chance(matched, n, 1.0 / n))


def _chance(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= k]: how often an unrelated model matches k or more triggers by luck."""
    tail = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
    return float(min(1.0, max(0.0, tail)))
