"""Output hardening: what of an inference result may leave the device, as the bundle's signed manifest
declares it (``manifest.output``; docs/security.md, "Output hardening").

Every path a result leaves by goes through :func:`result_json`: the service's pipeline (the API's answer,
the outbox record, the MQTT ``results`` message, the directory and serial sources, which only ever see the
pipeline's document) and ``edgeguard infer``. In order:

1. scores: the postprocess result's ``top`` / ``detections`` scores, or, without a postprocess, the top-k
   classes taken from the model's only output;
2. noise: Laplace (scale b) or Gaussian (standard deviation) on each reported score, drawn for each request
   from ``os.urandom`` by inverse transform (Laplace) or Box-Muller (Gaussian): no generator state to predict
   or to replay, and no 26 us of seeding a numpy generator per request; scores that were probabilities are
   clipped back to [0, 1], then re-sorted;
3. top-k: at most ``top_k`` classes / detections;
4. rounding: scores (and boxes, never finer than they were) to ``round_decimals`` decimals;
5. raw tensors: only with ``raw_logits = true`` and no postprocess result (rounded and noised the same way).

A bundle without an ``output`` declaration keeps the behaviour from before hardening existed (raw tensors
when there is no postprocess), byte for byte.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import OutputPolicy

from ._engine import InferenceResult

__all__ = ["result_json"]

_BOX_DECIMALS = 2  # what postprocess already rounds boxes to


class _UrandomNoise:
    """Noise for one request, straight from the OS's CSPRNG (``os.urandom``). Result lists are short, so
    they are drawn in plain Python (numpy's per-call overhead is larger than the work there); raw tensors,
    when a bundle lets them leave, in numpy."""

    def __init__(self, policy: OutputPolicy) -> None:
        assert policy.noise is not None
        self.laplace = policy.noise.kind == "laplace"
        self.scale = policy.noise.scale

    def values(self, n: int) -> list[float]:
        u = _uniform(2 * n if not self.laplace else n)
        if self.laplace:  # inverse CDF: v in (-0.5, 0.5), so the log never sees 0
            return [-self.scale * math.copysign(math.log1p(-2.0 * abs(x - 0.5)), x - 0.5) for x in u]
        return [self.scale * math.sqrt(-2.0 * math.log(u[i])) * math.cos(2.0 * math.pi * u[n + i])
                for i in range(n)]  # Box-Muller

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        bits = np.frombuffer(os.urandom(8 * n * 2), dtype=np.uint64) >> np.uint64(11)
        u = (bits.astype(np.float64) + 0.5) * 2.0**-53
        if self.laplace:
            v = u[:n] - 0.5
            out: np.ndarray = -self.scale * np.sign(v) * np.log1p(-2.0 * np.abs(v))
        else:
            out = self.scale * np.sqrt(-2.0 * np.log(u[:n])) * np.cos(2.0 * np.pi * u[n:])
        return out.reshape(shape)


def _uniform(n: int) -> list[float]:
    """``n`` uniform doubles in the open interval (0, 1): 53 random bits each, centred in their cell."""
    raw = os.urandom(8 * n)
    return [((int.from_bytes(raw[i:i + 8], "little") >> 11) + 0.5) * 2.0**-53 for i in range(0, 8 * n, 8)]


def result_json(result: InferenceResult, policy: OutputPolicy | None) -> dict[str, Any]:
    """The JSON-able result as it may leave the device under ``policy`` (``None``: not declared)."""
    if policy is None:
        return result.to_json()
    doc = result.to_json(include_outputs=False)
    noise = _UrandomNoise(policy) if policy.noise is not None else None
    post = result.post
    if post is None and policy.top_k is not None:
        post = _derived_topk(result.outputs, policy.top_k)
    if post is not None:
        doc["post"] = _harden_post(post, policy, noise)
    if policy.raw_logits and result.post is None:
        doc["outputs"] = {k: _harden_tensor(v, policy, noise) for k, v in result.outputs.items()}
    return doc


def _derived_topk(outputs: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """Top-k over the model's only output (the manifest reader made sure there is exactly one)."""
    raw = np.asarray(next(iter(outputs.values())), dtype=np.float64)
    rows = raw.reshape(1, -1) if raw.ndim <= 1 else raw.reshape(raw.shape[0], -1)
    items = []
    for row in rows:
        best = np.argsort(-row, kind="stable")[:k]
        items.append([{"class": int(i), "score": float(row[i])} for i in best])
    return {"kind": "topk", "top": items[0]} if len(items) == 1 else {"kind": "topk", "batch": items}


def _harden_post(
    post: dict[str, Any], policy: OutputPolicy, noise: _UrandomNoise | None
) -> dict[str, Any]:
    out = dict(post)
    for key in ("top", "detections"):
        if key in out:
            out[key] = _harden_items(out[key], policy, noise)
    if "batch" in out:
        out["batch"] = [_harden_items(items, policy, noise) for items in out["batch"]]
    return out


def _harden_items(
    items: list[dict[str, Any]], policy: OutputPolicy, noise: _UrandomNoise | None
) -> list[dict[str, Any]]:
    scores = [float(i["score"]) for i in items]
    if noise is not None and scores:
        probabilities = all(0.0 <= x <= 1.0 for x in scores)
        scores = [x + e for x, e in zip(scores, noise.values(len(scores)), strict=True)]
        if probabilities:
            scores = [min(1.0, max(0.0, x)) for x in scores]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep their order
    if policy.top_k is not None:
        order = order[: policy.top_k]
    out = []
    for i in order:
        item = dict(items[i])
        item["score"] = _round(scores[i], policy.round_decimals)
        if "box" in item and policy.round_decimals is not None:
            places = min(policy.round_decimals, _BOX_DECIMALS)
            item["box"] = [round(float(v), places) for v in item["box"]]
        out.append(item)
    return out


def _harden_tensor(v: np.ndarray, policy: OutputPolicy, noise: _UrandomNoise | None) -> dict[str, Any]:
    data = np.asarray(v)
    if data.dtype.kind == "f":
        data = data.astype(np.float64)
        if noise is not None:
            data = data + noise.array(data.shape)
        if policy.round_decimals is not None:
            data = np.round(data, policy.round_decimals)
    return {"shape": list(v.shape), "dtype": str(v.dtype), "data": data.tolist()}


def _round(value: float, decimals: int | None) -> float:
    return value if decimals is None else round(value, decimals)
