"""Publisher side of ``defence.adversarial``: the threshold (and squeezer scales) from clean inputs.

Split from ``edgeguard.engine.adversarial`` (the device side, which only parses and scores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import ConfigError

from .adversarial import (
    MIN_SCALE,
    AdversarialSpec,
    RunFn,
    SqueezerKind,
    parse_defence,
    squeeze_distances,
    squeeze_scores,
)

__all__ = ["calibrate_adversarial"]


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
    squeezers: Sequence[tuple[SqueezerKind, int]] | None = None,
) -> dict[str, Any]:
    """The ``defence`` declaration for ``manifest``'s model, calibrated on clean ``samples`` (publisher side).

    ``run`` is a reference run of the model (``edgeguard.bundle._reference.run_reference``). The threshold is
    the ``ceil((n + 1) * (1 - fpr))``-th smallest clean score (the conformal quantile: on fresh clean inputs
    from the same distribution the expected false-positive rate is at most ``fpr``), so at least
    ``1 / fpr - 1`` samples are needed. ``batched`` is set when one batched call gives the same outputs as
    separate calls and is not clearly slower than them (by 25 %) on this machine's CPU. ``softmax``
    defaults to the top-k post-processing's flag; ``value_range`` to the declared input range, else the
    samples' own.

    With ``squeezers`` (``[("bits", 4), ("bits", 5)]``) the declaration lists them instead of ``bits``,
    ``median`` and ``joint``: each one's scale is the median of its L1 distances on the clean samples, and
    the threshold is the same conformal quantile of the normalised score (the largest distance / scale).
    """
    if not 0.0 < fpr <= 0.5:
        raise ConfigError(f"fpr must be in (0, 0.5], got {fpr}")
    n = len(samples)
    rank = math.ceil((n + 1) * (1.0 - fpr))
    if rank > n:
        raise ConfigError(f"calibrating for a {fpr:g} false-positive rate needs at least "
                          f"{math.ceil(1 / fpr - 1)} clean samples, got {n}")
    post = manifest.postprocess or {}
    decl: dict[str, Any] = {"mode": mode, "threshold": 2.0, "fpr": fpr,
                            "softmax": bool(post.get("softmax", False)) if softmax is None else softmax}
    if squeezers is not None:
        decl["squeezers"] = [{kind: value, "scale": 1.0} for kind, value in squeezers]
    else:
        decl.update(bits=bits, median=median, joint=joint)
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
    distances = np.concatenate([squeeze_distances(run, s, spec)[1] for s in samples], axis=1)
    top = 2.0
    if spec.listed:
        scales = [round(max(float(np.median(d)), MIN_SCALE), 9) for d in distances]
        decl["squeezers"] = [{kind: value, "scale": sc} for (kind, value), sc in zip(squeezers or (), scales,
                                                                                    strict=True)]
        distances = distances / np.array(scales)[:, None]
        top = 2.0 / min(scales)
    scores = distances.max(axis=0)
    threshold = float(np.sort(scores)[rank - 1])
    decl.update(threshold=round(min(threshold * (1 + 1e-6) + 1e-9, top), 9), batched=spec.batched,
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
