"""Output hardening: what of an inference result may leave the device, as the bundle's signed manifest
declares it (``manifest.output``; docs/security.md, "Output hardening").

Every path a result leaves by goes through :func:`result_json`: the service's pipeline (the API's answer,
the outbox record, the MQTT ``results`` message, the directory and serial sources, which only ever see the
pipeline's document) and ``edgeguard infer``. In order:

1. scores: the postprocess result's ``top`` / ``detections`` scores, or, without a postprocess, the top-k
   classes taken from the model's only output;
2. noise: Laplace (scale b) or Gaussian (standard deviation) on each reported score, from a generator seeded
   per request from ``os.urandom`` (no shared state to predict or average out by replaying a seed); scores
   that were probabilities are clipped back to [0, 1], then re-sorted;
3. top-k: at most ``top_k`` classes / detections;
4. rounding: scores (and boxes, never finer than they were) to ``round_decimals`` decimals;
5. raw tensors: only with ``raw_logits = true`` and no postprocess result (rounded and noised the same way).

A bundle without an ``output`` declaration keeps the behaviour from before hardening existed (raw tensors
when there is no postprocess), byte for byte.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import OutputPolicy

from ._engine import InferenceResult

__all__ = ["result_json", "request_rng"]

_BOX_DECIMALS = 2  # what postprocess already rounds boxes to


def request_rng() -> np.random.Generator:
    """A generator for one request, seeded from the OS's entropy."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def result_json(result: InferenceResult, policy: OutputPolicy | None) -> dict[str, Any]:
    """The JSON-able result as it may leave the device under ``policy`` (``None``: not declared)."""
    if policy is None:
        return result.to_json()
    doc = result.to_json(include_outputs=False)
    rng = request_rng() if policy.noise is not None else None
    post = result.post
    if post is None and policy.top_k is not None:
        post = _derived_topk(result.outputs, policy.top_k)
    if post is not None:
        doc["post"] = _harden_post(post, policy, rng)
    if policy.raw_logits and result.post is None:
        doc["outputs"] = {k: _harden_tensor(v, policy, rng) for k, v in result.outputs.items()}
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
    post: dict[str, Any], policy: OutputPolicy, rng: np.random.Generator | None
) -> dict[str, Any]:
    out = dict(post)
    for key in ("top", "detections"):
        if key in out:
            out[key] = _harden_items(out[key], policy, rng)
    if "batch" in out:
        out["batch"] = [_harden_items(items, policy, rng) for items in out["batch"]]
    return out


def _harden_items(
    items: list[dict[str, Any]], policy: OutputPolicy, rng: np.random.Generator | None
) -> list[dict[str, Any]]:
    scores = np.array([float(i["score"]) for i in items], dtype=np.float64)
    if rng is not None and policy.noise is not None and scores.size:
        probabilities = bool(np.all((scores >= 0.0) & (scores <= 1.0)))
        scores = scores + _noise(rng, policy, scores.shape)
        if probabilities:
            scores = np.clip(scores, 0.0, 1.0)
    order = np.argsort(-scores, kind="stable")
    if policy.top_k is not None:
        order = order[: policy.top_k]
    out = []
    for i in order:
        item = dict(items[int(i)])
        item["score"] = _round(float(scores[int(i)]), policy.round_decimals)
        if "box" in item and policy.round_decimals is not None:
            places = min(policy.round_decimals, _BOX_DECIMALS)
            item["box"] = [round(float(v), places) for v in item["box"]]
        out.append(item)
    return out


def _harden_tensor(v: np.ndarray, policy: OutputPolicy, rng: np.random.Generator | None) -> dict[str, Any]:
    data = np.asarray(v)
    if data.dtype.kind == "f":
        data = data.astype(np.float64)
        if rng is not None and policy.noise is not None:
            data = data + _noise(rng, policy, data.shape)
        if policy.round_decimals is not None:
            data = np.round(data, policy.round_decimals)
    return {"shape": list(v.shape), "dtype": str(v.dtype), "data": data.tolist()}


def _noise(rng: np.random.Generator, policy: OutputPolicy, shape: tuple[int, ...]) -> np.ndarray:
    assert policy.noise is not None
    if policy.noise.kind == "laplace":
        return rng.laplace(0.0, policy.noise.scale, shape)
    return rng.normal(0.0, policy.noise.scale, shape)


def _round(value: float, decimals: int | None) -> float:
    return value if decimals is None else round(value, decimals)
