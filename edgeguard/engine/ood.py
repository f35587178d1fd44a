"""Out-of-distribution flags: does this input look like the data the publisher validated the model on?

At pack time the publisher calls ``compute_input_stats`` on its golden or calibration inputs and stores the
result in ``manifest.input_stats``. At run time ``OodMonitor.check`` compares each validated input with it,
per channel, on three cheap statistics:

* brightness — the input's channel mean as a z-score against the reference pixel mean and std;
* contrast   — the ratio of the input's channel std to the reference std;
* texture    — the correlation of horizontally neighbouring values. Natural images are smooth (close to 1),
  noise and many adversarial perturbations are not (close to 0); this catches what the mean and std miss,
  since uniform noise has an ordinary mean and std.

A flagged input is counted and reported; it is rejected only when the declaration says
``"action": "reject"``. This is a first, cheap layer of defence, not a detector of crafted adversarial
examples (see docs/processing.md).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import InputRejected

from ._declarations import DeclReader

__all__ = [
    "InputStats",
    "OodMonitor",
    "OodVerdict",
    "compute_input_stats",
    "input_stats_for",
    "parse_input_stats",
]

STATS_VERSION: Final = 1
_ROW_STRIDE: Final = 4  # texture is measured on every 4th row: a quarter of the cost, same answer on images


@dataclass(frozen=True, kw_only=True)
class InputStats:
    """A validated ``manifest.input_stats`` declaration."""

    input: str
    channel_axis: int | None
    count: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    smoothness: tuple[float, ...]  # lowest neighbour correlation seen per channel in the reference set
    z_threshold: float = 3.0
    contrast_factor: float = 4.0
    texture_fraction: float = 0.5
    action: Literal["flag", "reject"] = "flag"


@dataclass(frozen=True)
class OodVerdict:
    flagged: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "reason": self.reason}


def _channels_first(array: np.ndarray, channel_axis: int | None) -> np.ndarray:
    data = np.asarray(array, dtype=np.float32)
    if channel_axis is None:
        return data.reshape(1, *data.shape) if data.ndim else data.reshape(1, 1)
    return np.moveaxis(data, channel_axis, 0)


def _features(array: np.ndarray, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, std and neighbour correlation of one input."""
    data = _channels_first(array, channel_axis)
    flat = data.reshape(data.shape[0], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    rows = data[..., ::_ROW_STRIDE, :] if data.ndim >= 3 else data
    left = rows[..., :-1].reshape(data.shape[0], -1).astype(np.float64)
    right = rows[..., 1:].reshape(data.shape[0], -1).astype(np.float64)
    if left.shape[1] < 2:
        return mean, std, np.ones_like(mean)
    left -= left.mean(axis=1, keepdims=True)
    right -= right.mean(axis=1, keepdims=True)
    denom = np.sqrt((left * left).sum(axis=1) * (right * right).sum(axis=1))
    # A constant channel has no texture to judge: call it smooth (the contrast check flags it instead).
    corr = np.where(denom > 0, (left * right).sum(axis=1) / np.where(denom > 0, denom, 1.0), 1.0)
    return mean, std, corr


def compute_input_stats(
    samples: Iterable[np.ndarray],
    *,
    input_name: str,
    channel_axis: int | None = 1,
    z_threshold: float = 3.0,
    action: Literal["flag", "reject"] = "flag",
) -> dict[str, Any]:
    """Reference statistics of ``samples`` (each one model input, e.g. ``[1, 3, H, W]``) for the manifest.

    Publishers call this on the golden or calibration inputs and store the result as ``input_stats``.
    """
    count = 0
    total = total_sq = None
    n_values = 0
    smooth_min: np.ndarray | None = None
    for sample in samples:
        data = _channels_first(sample, channel_axis)
        flat = data.reshape(data.shape[0], -1).astype(np.float64)
        total = flat.sum(axis=1) if total is None else total + flat.sum(axis=1)
        total_sq = (flat * flat).sum(axis=1) if total_sq is None else total_sq + (flat * flat).sum(axis=1)
        n_values += flat.shape[1]
        _, _, corr = _features(sample, channel_axis)
        smooth_min = corr if smooth_min is None else np.minimum(smooth_min, corr)
        count += 1
    if count == 0 or total is None or total_sq is None or smooth_min is None:
        raise ValueError("compute_input_stats needs at least one sample")
    mean = total / n_values
    std = np.sqrt(np.maximum(total_sq / n_values - mean * mean, 0.0))
    return {
        "version": STATS_VERSION,
        "input": input_name,
        "channel_axis": channel_axis,
        "count": count,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "smoothness": [round(float(v), 6) for v in smooth_min],
        "z_threshold": z_threshold,
        "action": action,
    }


def input_stats_for(
    manifest: Manifest, samples: Iterable[Mapping[str, np.ndarray]], *, z_threshold: float = 3.0,
    action: Literal["flag", "reject"] = "flag",
) -> dict[str, Any]:
    """``compute_input_stats`` for a manifest's image input (the one ``preprocess`` targets, else the only
    input), taking the channel axis from the declared layout (NCHW: 1, NHWC: 3) or, without a declaration,
    the axis of size 3 of a rank-4 input. ``samples`` are golden or calibration inputs keyed by name.
    """
    names = [spec.name for spec in manifest.inputs]
    decl = manifest.preprocess or {}
    declared = decl.get("input")
    name = declared if isinstance(declared, str) else (names[0] if len(names) == 1 else None)
    spec = next((s for s in manifest.inputs if s.name == name), None)
    if spec is None:
        raise ValueError(f"cannot tell which input to describe among {names}; name it in preprocess.input")
    axis: int | None = None
    if decl.get("layout") == "NHWC":
        axis = 3
    elif manifest.preprocess is not None:
        axis = 1
    elif len(spec.shape) == 4:
        axis = next((a for a in (1, 3) if spec.shape[a] == 3), None)
    return compute_input_stats((sample[spec.name] for sample in samples), input_name=spec.name,
                               channel_axis=axis, z_threshold=z_threshold, action=action)


def parse_input_stats(manifest: Manifest) -> InputStats | None:
    """Validate ``manifest.input_stats``; ``None`` if absent. Raises ``ConfigError`` naming the key."""
    if manifest.input_stats is None:
        return None
    r = DeclReader("input_stats", manifest.input_stats)
    r.integer("version", STATS_VERSION, low=STATS_VERSION, high=STATS_VERSION)
    inputs = {spec.name: spec for spec in manifest.inputs}
    name = r.string("input", next(iter(inputs)) if len(inputs) == 1 else None)
    if name not in inputs:
        raise r.fail("input", f"{name!r} is not a declared input ({', '.join(inputs) or 'none declared'})")
    rank = len(inputs[name].shape)
    axis = r.nullable_integer("channel_axis", low=-rank, high=rank - 1)
    mean = r.numbers("mean", None)
    channels = len(mean)
    if axis is not None and inputs[name].shape[axis] not in (None, channels):
        raise r.fail("mean", f"{channels} channels but input {name!r} axis {axis} is "
                     f"{inputs[name].shape[axis]}")
    if axis is None and channels != 1:
        raise r.fail("mean", "one value expected when channel_axis is null")
    stats = InputStats(
        input=name,
        channel_axis=axis,
        count=r.integer("count", low=1, high=1 << 31),
        mean=mean,
        std=r.numbers("std", None, length=channels, low=0.0),
        smoothness=r.numbers("smoothness", None, length=channels, low=-1.0, high=1.0),
        z_threshold=r.number("z_threshold", 3.0, low=0.1, high=1e6),
        contrast_factor=r.number("contrast_factor", 4.0, low=1.0, high=1e6),
        texture_fraction=r.number("texture_fraction", 0.5, low=0.0, high=1.0),
        action=r.string("action", "flag", choices=("flag", "reject")),  # type: ignore[arg-type]
    )
    r.finish()
    return stats


class OodMonitor:
    """Checks validated inputs against ``InputStats`` and counts the flagged ones (thread-safe)."""

    def __init__(self, stats: InputStats) -> None:
        self.stats = stats
        self._mean = np.asarray(stats.mean)
        self._std = np.maximum(np.asarray(stats.std), 1e-12)
        self._smooth = np.asarray(stats.smoothness)
        self._lock = threading.Lock()
        self._checked = 0
        self._flagged = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> OodMonitor | None:
        stats = parse_input_stats(manifest)
        return None if stats is None else cls(stats)

    @property
    def flagged(self) -> int:
        with self._lock:
            return self._flagged

    @property
    def checked(self) -> int:
        with self._lock:
            return self._checked

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"checked": self._checked, "flagged": self._flagged}

    def verdict(self, inputs: Mapping[str, np.ndarray]) -> OodVerdict:
        """Judge one (already guarded) input without counting it."""
        s = self.stats
        array = inputs.get(s.input)
        if array is None:
            return OodVerdict(False)
        mean, std, smooth = _features(array, s.channel_axis)
        if mean.shape != self._mean.shape:
            return OodVerdict(True, f"{mean.size} channels, the reference has {self._mean.size}")
        z = np.abs(mean - self._mean) / self._std
        worst = int(np.argmax(z))
        if z[worst] > s.z_threshold:
            return OodVerdict(True, f"channel {worst} mean {mean[worst]:.4g} is {z[worst]:.1f} std from the "
                              f"reference {self._mean[worst]:.4g} (threshold {s.z_threshold:g})")
        ratio = std / self._std
        for c, value in enumerate(ratio):
            if not 1.0 / s.contrast_factor <= value <= s.contrast_factor or not math.isfinite(value):
                return OodVerdict(True, f"channel {c} contrast is {value:.2f}x the reference "
                                  f"(allowed 1/{s.contrast_factor:g}..{s.contrast_factor:g})")
        floor = self._smooth * s.texture_fraction
        for c, (value, low) in enumerate(zip(smooth, floor, strict=True)):
            if value < low:
                return OodVerdict(True, f"channel {c} texture: neighbour correlation {value:.2f}, the "
                                  f"reference is at least {self._smooth[c]:.2f} (noise-like input)")
        return OodVerdict(False)

    def check(self, inputs: Mapping[str, np.ndarray]) -> OodVerdict:
        """Judge and count one input; raise ``InputRejected`` if flagged and the action is ``reject``."""
        verdict = self.verdict(inputs)
        with self._lock:
            self._checked += 1
            self._flagged += int(verdict.flagged)
        if verdict.flagged and self.stats.action == "reject":
            raise InputRejected(f"input {self.stats.input!r} is out of distribution: {verdict.reason}")
        return verdict
