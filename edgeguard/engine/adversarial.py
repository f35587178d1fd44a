"""Adversarial-input detection by feature squeezing, declared in ``manifest.defence.adversarial``.

An input crafted to fool a model sits close to a decision boundary that only exists at full precision:
squeezing it (fewer bits per value, a median filter) moves the model's answer a lot, while a natural input's
answer barely moves. The score of one input is the largest L1 distance between the model's output
probabilities on the input and on each of its squeezed versions (Xu et al., NDSS 2018, section 3.3).

A declaration may instead list its ``squeezers`` explicitly, each with a ``scale`` (the median L1 distance it
gives on clean calibration inputs): the score is then the largest *normalised* distance, each squeezer's
distance divided by its own scale, so that one threshold is not dominated by the squeezer whose clean
distances happen to be largest (``calibrate_adversarial(squeezers=...)``; chosen per model by
``edgeguard robustness --search``). Declarations without ``squeezers`` score exactly as before.

The publisher calibrates the threshold at pack time (``calibrate_adversarial``) on clean inputs, as the
``1 - fpr`` quantile of their scores, and signs it in the manifest with the mode:

* ``flag``   — every result carries ``adversarial_score`` and ``adversarial: true/false``;
* ``reject`` — an input over the threshold is refused with ``AdversarialInput`` (API 422, an
  ``adversarial-input`` event and audit record); the service keeps serving.

Cost: when the declaration says the model takes a dynamic batch (``batched``, checked at calibration against
separate runs), the input and its squeezed versions run as one batch of ``1 + squeezers`` — one session
call; otherwise one call each. Without a declaration nothing runs at all.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.errors import AdversarialInput, InputRejected

from ._declarations import DeclReader
from .squeeze import median_smooth, reduce_bit_depth, reduce_bit_depths

__all__ = [
    "AdversarialSpec",
    "AdversarialVerdict",
    "SqueezeDetector",
    "parse_defence",
    "squeeze_scores",
    "squeeze_distances",
    "Squeezer",
]

DEFENCE_KEYS: Final = ("adversarial",)  # the sections of manifest.defence this runtime knows
_FLOAT_DTYPES: Final = frozenset({"float32", "float16", "float64"})
RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
SqueezerKind = Literal["bits", "median"]
MAX_SQUEEZERS: Final = 4  # each one is one more model input per request
MIN_SCALE: Final = 1e-6  # a clean distance floor: a squeezer that never moves a clean answer


@dataclass(frozen=True)
class Squeezer:
    """One entry of ``squeezers``: ``bits`` (levels = 2**value) or ``median`` (window), and its scale."""

    kind: SqueezerKind
    value: int
    scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {self.kind: self.value, "scale": self.scale}


@dataclass(frozen=True, kw_only=True)
class AdversarialSpec:
    """A validated ``manifest.defence.adversarial`` declaration."""

    mode: Literal["flag", "reject"]
    threshold: float  # scores above it are adversarial
    fpr: float  # the false-positive rate the threshold was calibrated for (reported, not used)
    input: str
    output: str
    softmax: bool  # the output holds logits: softmax them before comparing
    bits: int  # bit-depth squeezer: levels = 2**bits (0 = off)
    median: int  # median squeezer: window size (0 = off)
    spatial: tuple[int, int] | None  # height and width axes of the input (the median filter's)
    value_range: tuple[float, float]  # the range the bit-depth squeezer quantises
    batched: bool  # run input + squeezed versions as one batch
    calibrated_on: int = 0  # clean samples behind the threshold
    joint: bool = False  # one squeezed version (bits, then median) instead of one per squeezer
    listed: tuple[Squeezer, ...] = ()  # the ``squeezers`` key: explicit set, normalised score

    def scales(self) -> np.ndarray:
        """Each squeezed version's divisor, ``[squeezers, 1]`` (ones without a ``squeezers`` list)."""
        if self.listed:
            return self._scales
        return np.ones((len(self.squeezers()), 1), dtype=np.float64)

    @functools.cached_property
    def _scales(self) -> np.ndarray:  # per request: built once
        return np.array([[s.scale] for s in self.listed], dtype=np.float64)

    @functools.cached_property
    def _depths(self) -> tuple[int, ...]:
        return tuple(s.value for s in self.listed)

    def squeeze(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Every squeezed version of ``x``, in ``squeezers()`` order (one array when all are bit depths)."""
        if self.listed and all(s.kind == "bits" for s in self.listed):
            lo, hi = self.value_range
            return reduce_bit_depths(x, self._depths, low=lo, high=hi).astype(x.dtype, copy=False)
        return [fn(x).astype(x.dtype, copy=False) for fn in self.squeezers()]

    def squeezers(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        out: list[Callable[[np.ndarray], np.ndarray]] = []
        if self.listed:
            lo, hi = self.value_range
            axes = self.spatial or (0, 1)  # parsing refuses a median without image axes
            for sq in self.listed:
                if sq.kind == "bits":
                    out.append(functools.partial(reduce_bit_depth, bits=sq.value, low=lo, high=hi))
                else:
                    out.append(functools.partial(median_smooth, window=sq.value, axes=axes))
            return out
        if self.bits:
            lo, hi = self.value_range
            out.append(lambda x: reduce_bit_depth(x, self.bits, low=lo, high=hi))
        if self.median and self.spatial is not None:
            axes = self.spatial
            out.append(lambda x: median_smooth(x, self.median, axes=axes))
        if self.joint and len(out) == 2:
            first, second = out
            return [lambda x: second(first(x))]
        return out

    def to_json(self) -> dict[str, Any]:
        if self.listed:
            return {
                "mode": self.mode, "threshold": self.threshold, "fpr": self.fpr, "input": self.input,
                "output": self.output, "softmax": self.softmax,
                "squeezers": [s.to_json() for s in self.listed],
                "spatial": list(self.spatial) if self.spatial is not None else None,
                "range": list(self.value_range), "batched": self.batched, "calibrated_on": self.calibrated_on,
            }
        return {
            "mode": self.mode, "threshold": self.threshold, "fpr": self.fpr, "input": self.input,
            "output": self.output, "softmax": self.softmax, "bits": self.bits, "median": self.median,
            "spatial": list(self.spatial) if self.spatial is not None else None,
            "range": list(self.value_range), "batched": self.batched, "calibrated_on": self.calibrated_on,
            "joint": self.joint,
        }


@dataclass(frozen=True)
class AdversarialVerdict:
    score: float
    adversarial: bool


def _default_spatial(spec: TensorSpec) -> tuple[int, int] | None:
    """NCHW ([n, c, h, w] with c in 1..4) -> (2, 3); NHWC -> (1, 2); [n, h, w] -> (1, 2); else none."""
    shape = spec.shape
    if len(shape) == 4:
        if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
            return (1, 2)
        return (2, 3)
    if len(shape) == 3:
        return (1, 2)
    return None


def _parse_adversarial(r: DeclReader, manifest: Manifest) -> AdversarialSpec:
    inputs = {s.name: s for s in manifest.inputs}
    outputs = {s.name: s for s in manifest.outputs}
    name = r.string("input", next(iter(inputs)) if len(inputs) == 1 else None)
    if name not in inputs:
        raise r.fail("input", f"{name!r} is not a declared input ({', '.join(inputs) or 'none declared'})")
    spec = inputs[name]
    if spec.dtype not in _FLOAT_DTYPES:
        raise r.fail("input", f"{name!r} is {spec.dtype}; feature squeezing needs a floating-point input")
    out = r.string("output", next(iter(outputs)) if len(outputs) == 1 else None)
    if out not in outputs:
        raise r.fail("output", f"{out!r} is not a declared output ({', '.join(outputs) or 'none declared'})")
    out_shape = outputs[out].shape
    if not out_shape or out_shape[0] not in (None, 1):
        raise r.fail("output", f"{out!r} {list(out_shape)} is not batch-first class scores ([1 or ?, ...])")
    rank = len(spec.shape)
    spatial: tuple[int, int] | None = _default_spatial(spec)
    if r.has("spatial"):
        axes = r.numbers("spatial", None, length=2, low=-rank, high=rank - 1)
        if any(a != int(a) for a in axes) or int(axes[0]) % rank == int(axes[1]) % rank or rank < 2:
            raise r.fail("spatial", f"two different integer axes of the rank-{rank} input expected")
        spatial = (int(axes[0]) % rank, int(axes[1]) % rank)
    if spec.value_range is not None and not r.has("range"):
        lo, hi = spec.value_range
    else:
        lo, hi = r.numbers("range", None, length=2)
    if not hi > lo:
        raise r.fail("range", f"[{lo:g}, {hi:g}] is empty")
    listed = _parse_squeezers(r, spatial, name, spec) if r.has("squeezers") else ()
    if listed:
        for key in ("bits", "median", "joint"):
            if r.has(key):
                raise r.fail(key, "cannot be combined with squeezers (list every squeezer there)")
        bits = median = 0
    else:
        bits = r.integer("bits", 4, low=0, high=16)
        median = r.integer("median", 2, low=0, high=7)
        if median == 1:
            raise r.fail("median", "a window of 1 changes nothing; use 0 (off) or 2..7")
        if median and spatial is None:
            raise r.fail("median", f"input {name!r} {list(spec.shape)} has no image axes; "
                         "set spatial or median 0")
        if not bits and not median:
            raise r.fail("bits", "bits and median are both 0: no squeezer left")
    # An L1 distance between two distributions is at most 2; a normalised one at most 2 / the smallest scale.
    top = 2.0 / min(s.scale for s in listed) if listed else 2.0
    batch_axes = {s.shape[0] for s in manifest.inputs if s.shape}
    parsed = AdversarialSpec(
        mode=r.string("mode", choices=("flag", "reject")),  # type: ignore[arg-type]
        threshold=r.number("threshold", low=0.0, high=top),
        fpr=r.number("fpr", low=0.0, high=0.5),
        input=name,
        output=out,
        softmax=r.boolean("softmax", False),
        bits=bits,
        median=median,
        spatial=spatial,
        value_range=(lo, hi),
        batched=r.boolean("batched", False),
        calibrated_on=r.integer("calibrated_on", 0, low=0, high=1 << 31),
        joint=r.boolean("joint", False) if not listed else False,
        listed=listed,
    )
    if parsed.batched and not batch_axes <= {None, 1}:
        raise r.fail("batched", "every input's first axis must be the batch (1 or dynamic)")
    r.finish()
    return parsed


def _parse_squeezers(r: DeclReader, spatial: tuple[int, int] | None, name: str, spec: TensorSpec,
                     ) -> tuple[Squeezer, ...]:
    """``squeezers``: 1..MAX_SQUEEZERS objects ``{"bits": 1..16 | "median": 2..7, "scale": > 0}``."""
    raw = r.raw_list("squeezers", max_items=MAX_SQUEEZERS)
    if not raw:
        raise r.fail("squeezers", "an empty list leaves no squeezer")
    out: list[Squeezer] = []
    for i, item in enumerate(raw):
        e = DeclReader(f"{r.where}.squeezers[{i}]", item)
        kinds = [k for k in ("bits", "median") if e.has(k)]
        if len(kinds) != 1:
            raise r.fail("squeezers", f"item {i} must have exactly one of bits, median")
        kind: SqueezerKind = "bits" if kinds[0] == "bits" else "median"
        value = e.integer(kind, low=1, high=16) if kind == "bits" else e.integer(kind, low=2, high=7)
        if kind == "median" and spatial is None:
            raise r.fail("squeezers", f"item {i}: input {name!r} {list(spec.shape)} has no image axes; "
                         "set spatial or drop the median")
        scale = e.number("scale", low=MIN_SCALE, high=2.0)
        e.finish()
        sq = Squeezer(kind, value, scale)
        if any((s.kind, s.value) == (sq.kind, sq.value) for s in out):
            raise r.fail("squeezers", f"item {i} repeats {kind} {value}")
        out.append(sq)
    return tuple(out)


def parse_defence(manifest: Manifest) -> AdversarialSpec | None:
    """Validate ``manifest.defence``; the adversarial section or ``None``. Raises ``ConfigError``."""
    if manifest.defence is None:
        return None
    r = DeclReader("defence", manifest.defence)
    adv = r.obj("adversarial")
    parsed = _parse_adversarial(adv, manifest) if adv is not None else None
    r.finish()  # refuses a section this runtime does not know (DEFENCE_KEYS)
    return parsed


def _probabilities(output: np.ndarray, n: int, softmax: bool) -> np.ndarray:
    flat = np.asarray(output, dtype=np.float64).reshape(n, -1)
    if softmax:
        flat = flat - flat.max(axis=1, keepdims=True)
        np.exp(flat, out=flat)
        flat /= flat.sum(axis=1, keepdims=True)
    return flat


def squeeze_scores(run: RunFn, inputs: Mapping[str, np.ndarray], spec: AdversarialSpec,
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Outputs on ``inputs`` and the score of each sample in its batch (max L1 over the squeezers, each
    divided by its scale when the declaration lists ``squeezers``)."""
    outputs, distances = squeeze_distances(run, inputs, spec)
    if spec.listed:
        distances /= spec.scales()
    return outputs, distances.max(axis=0)


def squeeze_distances(run: RunFn, inputs: Mapping[str, np.ndarray], spec: AdversarialSpec,
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Outputs on ``inputs`` and the L1 distance of every squeezed version, ``[squeezers, samples]``.

    ``run`` is one model call. With ``spec.batched`` the input and its squeezed versions are one call on a
    batch ``1 + squeezers`` times as large (the other inputs repeated), else one call each.
    """
    x = inputs[spec.input]
    n = int(x.shape[0]) if x.ndim else 1
    squeezed = spec.squeeze(x)
    if spec.batched:
        k = 1 + len(squeezed)
        stacked = (np.concatenate([x[None], squeezed]).reshape(k * n, *x.shape[1:])
                   if isinstance(squeezed, np.ndarray) else np.concatenate([x, *squeezed], axis=0))
        batch = {name: stacked if name == spec.input else np.concatenate([value] * k, axis=0)
                 for name, value in inputs.items()}
        raw = run(batch)
        # Copies: a result must not keep the whole batch (1 + squeezers times its size) alive.
        outputs = {name: np.array(value[:n]) for name, value in raw.items()}
        probs = _probabilities(raw[spec.output], k * n, spec.softmax).reshape(k, n, -1)
        base, others = probs[0], probs[1:]
    else:
        outputs = dict(run(inputs))
        base = _probabilities(outputs[spec.output], n, spec.softmax)
        others = np.stack([
            _probabilities(run({**inputs, spec.input: s})[spec.output], n, spec.softmax) for s in squeezed
        ])
    return outputs, np.abs(others - base[None]).sum(axis=2)


class SqueezeDetector:
    """Scores inputs and counts verdicts (thread-safe)."""

    def __init__(self, spec: AdversarialSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._checked = self._flagged = self._rejected = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> SqueezeDetector | None:
        spec = parse_defence(manifest)
        return None if spec is None else cls(spec)

    def run(self, run: RunFn, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                         AdversarialVerdict]:
        """Outputs on ``inputs`` and the verdict; raises ``AdversarialInput`` in ``reject`` mode."""
        try:
            outputs, scores = squeeze_scores(run, inputs, self.spec)
        except ValueError as exc:  # an output whose size does not follow the batch: refuse this one request
            raise InputRejected(f"cannot score output {self.spec.output!r} for adversarial inputs: "
                                f"{str(exc)[:200]}") from None
        score = float(scores.max()) if scores.size else 0.0
        if not math.isfinite(score):
            score = 2.0  # a NaN probability is no sign of a clean input
        flagged = score > self.spec.threshold
        with self._lock:
            self._checked += 1
            self._flagged += int(flagged)
            self._rejected += int(flagged and self.spec.mode == "reject")
        if flagged and self.spec.mode == "reject":
            raise AdversarialInput(
                f"input {self.spec.input!r} looks adversarial: feature-squeezing score {score:.4f} is over "
                f"the calibrated threshold {self.spec.threshold:.4f}", score=score,
                threshold=self.spec.threshold)
        return outputs, AdversarialVerdict(round(score, 6), flagged)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": self.spec.mode, "checked": self._checked, "flagged": self._flagged,
                    "rejected": self._rejected}
