"""Adversarial-input detection by feature squeezing, declared in ``manifest.defence.adversarial``.

An input crafted to fool a model sits close to a decision boundary that only exists at full precision:
squeezing it (fewer bits per value, a median filter) moves the model's answer a lot, while a natural input's
answer barely moves. The score of one input is the largest L1 distance between the model's output
probabilities on the input and on each of its squeezed versions (Xu et al., NDSS 2018, section 3.3).

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

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.errors import AdversarialInput, ConfigError, InputRejected

from ._declarations import DeclReader
from .squeeze import median_smooth, reduce_bit_depth

__all__ = [
    "AdversarialSpec",
    "AdversarialVerdict",
    "SqueezeDetector",
    "parse_defence",
    "calibrate_adversarial",
    "squeeze_scores",
]

DEFENCE_KEYS: Final = ("adversarial",)  # the sections of manifest.defence this runtime knows
_FLOAT_DTYPES: Final = frozenset({"float32", "float16", "float64"})
RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


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

    def squeezers(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        out: list[Callable[[np.ndarray], np.ndarray]] = []
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
    bits = r.integer("bits", 4, low=0, high=16)
    median = r.integer("median", 2, low=0, high=7)
    if median == 1:
        raise r.fail("median", "a window of 1 changes nothing; use 0 (off) or 2..7")
    if median and spatial is None:
        raise r.fail("median", f"input {name!r} {list(spec.shape)} has no image axes; "
                     "set spatial or median 0")
    if not bits and not median:
        raise r.fail("bits", "bits and median are both 0: no squeezer left")
    batch_axes = {s.shape[0] for s in manifest.inputs if s.shape}
    parsed = AdversarialSpec(
        mode=r.string("mode", choices=("flag", "reject")),  # type: ignore[arg-type]
        threshold=r.number("threshold", low=0.0, high=2.0),  # L1 between two distributions is at most 2
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
        joint=r.boolean("joint", False),
    )
    if parsed.batched and not batch_axes <= {None, 1}:
        raise r.fail("batched", "every input's first axis must be the batch (1 or dynamic)")
    r.finish()
    return parsed


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
    """Outputs on ``inputs`` and the score of each sample in its batch (max L1 over the squeezers).

    ``run`` is one model call. With ``spec.batched`` the input and its squeezed versions are one call on a
    batch ``1 + squeezers`` times as large (the other inputs repeated), else one call each.
    """
    x = inputs[spec.input]
    n = int(x.shape[0]) if x.ndim else 1
    squeezed = [fn(x).astype(x.dtype, copy=False) for fn in spec.squeezers()]
    if spec.batched:
        k = 1 + len(squeezed)
        batch = {name: (np.concatenate([x, *squeezed], axis=0) if name == spec.input
                        else np.concatenate([value] * k, axis=0))
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
    scores = np.abs(others - base[None]).sum(axis=2).max(axis=0)
    return outputs, scores


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


def calibrate_adversarial(
    run: RunFn,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    manifest: Manifest,
    mode: Literal["flag", "reject"] = "flag",
    fpr: float = 0.05,
    bits: int = 4,
    median: int = 2,
    softmax: bool | None = None,
    value_range: tuple[float, float] | None = None,
    output: str | None = None,
    joint: bool = False,
) -> dict[str, Any]:
    """The ``defence`` declaration for ``manifest``'s model, calibrated on clean ``samples`` (publisher side).

    ``run`` is a reference run of the model (``edgeguard.bundle._reference.run_reference``). The threshold is
    the ``ceil((n + 1) * (1 - fpr))``-th smallest clean score (the conformal quantile: on fresh clean inputs
    from the same distribution the expected false-positive rate is at most ``fpr``), so at least
    ``1 / fpr - 1`` samples are needed. ``batched`` is set when one batched call gives the same outputs as
    separate calls and is not clearly slower than them (by 25 %) on this machine's CPU. ``softmax``
    defaults to the top-k post-processing's flag; ``value_range`` to the declared input range, else the
    samples' own.
    """
    if not 0.0 < fpr <= 0.5:
        raise ConfigError(f"fpr must be in (0, 0.5], got {fpr}")
    n = len(samples)
    rank = math.ceil((n + 1) * (1.0 - fpr))
    if rank > n:
        raise ConfigError(f"calibrating for a {fpr:g} false-positive rate needs at least "
                          f"{math.ceil(1 / fpr - 1)} clean samples, got {n}")
    post = manifest.postprocess or {}
    decl: dict[str, Any] = {"mode": mode, "threshold": 2.0, "fpr": fpr, "bits": bits, "median": median,
                            "softmax": bool(post.get("softmax", False)) if softmax is None else softmax,
                            "joint": joint}
    if output is not None:
        decl["output"] = output
    elif isinstance(post.get("output"), str):
        decl["output"] = post["output"]
    inputs = {s.name: s for s in manifest.inputs}
    name = next(iter(inputs)) if len(inputs) == 1 else (manifest.preprocess or {}).get("input")
    if not isinstance(name, str) or name not in inputs:
        raise ConfigError(f"cannot tell which input to squeeze among {list(inputs)}")
    decl["input"] = name
    if value_range is None and inputs[name].value_range is None:
        stacked = [np.asarray(s[name]) for s in samples]
        value_range = (float(min(a.min() for a in stacked)), float(max(a.max() for a in stacked)))
    if value_range is not None:
        decl["range"] = [float(value_range[0]), float(value_range[1])]
    probe = Manifest(**{**_fields(manifest), "defence": {"adversarial": decl}})
    try:
        spec = parse_defence(probe)
    except ConfigError as exc:
        raise ConfigError(f"defence: {exc}") from None
    assert spec is not None
    spec = _with_batching(run, samples[0], spec) if samples else spec
    scores = np.concatenate([squeeze_scores(run, s, spec)[1] for s in samples])
    threshold = float(np.sort(scores)[rank - 1])
    decl.update(threshold=round(min(threshold * (1 + 1e-6) + 1e-9, 2.0), 9), batched=spec.batched,
                calibrated_on=int(scores.size))
    return {"adversarial": decl}


def _fields(manifest: Manifest) -> dict[str, Any]:
    return {f: getattr(manifest, f) for f in manifest.__dataclass_fields__}


def _with_batching(run: RunFn, sample: Mapping[str, np.ndarray], spec: AdversarialSpec) -> AdversarialSpec:
    """``spec`` with ``batched`` true when a batched call agrees with separate calls on ``sample``."""
    if any(np.asarray(v).shape[:1] != (1,) for v in sample.values()):
        return spec
    separate = squeeze_scores(run, sample, _replace(spec, batched=False))
    try:
        together = squeeze_scores(run, sample, _replace(spec, batched=True))
    except Exception:  # a fixed batch axis: the library refuses the batch
        return _replace(spec, batched=False)
    same = all(np.allclose(together[0][k], separate[0][k], rtol=1e-3, atol=1e-5) for k in separate[0]) and \
        np.allclose(together[1], separate[1], rtol=1e-3, atol=1e-5)
    if not same:
        return _replace(spec, batched=False)
    # Batched unless separate calls are clearly faster: the two are close for a conv net, and a timing on a
    # busy machine must not flip the choice on noise.
    slower = _median_s(lambda: squeeze_scores(run, sample, _replace(spec, batched=True))) > \
        1.25 * _median_s(lambda: squeeze_scores(run, sample, _replace(spec, batched=False)))
    return _replace(spec, batched=not slower)


def _median_s(fn: Callable[[], object], runs: int = 7) -> float:
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def _replace(spec: AdversarialSpec, **changes: Any) -> AdversarialSpec:
    return AdversarialSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, **changes})
