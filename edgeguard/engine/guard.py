"""The input guard: the one place where an inference request's tensors are checked against the manifest.

Every tensor that reaches a backend has passed ``InputGuard.check``: the right names, the exact dtype, a
shape that matches the declared one (``None`` axes are dynamic), only finite values, values inside the
declared range and a total size under the limit. A bad input raises ``InputRejected`` with one line that says
exactly what was wrong, and is counted by check so the heartbeat can report it; the guard holds no other
state, so the engine keeps serving after a rejection.

Checks run cheapest first (names, dtype, shape, size) so a huge or malformed request is refused before its
values are scanned.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.errors import BundleRejected, ConfigError, InputRejected

from .adversarial import parse_defence
from .ood import parse_input_stats
from .postprocess import parse_postprocess
from .preprocess import parse_preprocess

__all__ = ["GuardLimits", "InputGuard", "REJECTION_CHECKS", "format_shape", "validate_declarations"]

# The names under which rejections are counted (stable: they appear in the heartbeat).
# "image" counts requests refused before the guard, while decoding or preprocessing an image.
REJECTION_CHECKS: Final[tuple[str, ...]] = (
    "name", "type", "dtype", "shape", "size", "finite", "range", "image", "ood", "adversarial",
)

_MAX_RANK: Final = 8


@dataclass(frozen=True, kw_only=True)
class GuardLimits:
    """Hard bounds on one inference request.

    ``max_total_bytes`` caps the sum of all input tensors (a dynamic axis could otherwise ask for gigabytes);
    ``max_dynamic_axis`` caps any single dynamic axis. ``allow_non_finite`` turns the NaN/Inf check off for
    models that use them on purpose (rare; off by default).
    """

    max_total_bytes: int = 64 * 1024 * 1024
    max_dynamic_axis: int = 16384
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_total_bytes <= 4 * 1024**3:
            raise ValueError(f"max_total_bytes must be in [1, 4 GiB], got {self.max_total_bytes}")
        if not 1 <= self.max_dynamic_axis <= 1 << 24:
            raise ValueError(f"max_dynamic_axis must be in [1, 2**24], got {self.max_dynamic_axis}")


def format_shape(shape: tuple[int | None, ...]) -> str:
    """A declared shape as the guard's messages print it: ``[1, 3, ?, ?]`` (``?`` is a dynamic axis)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


class InputGuard:
    """Validates inference inputs against ``manifest.inputs``; counts what it rejects.

    ``check`` returns a new dict of C-contiguous arrays keyed by input name, in manifest order, so backends
    can hand them to the library without another copy. Thread-safe: the counters are behind a lock.
    """

    def __init__(self, manifest: Manifest, *, limits: GuardLimits | None = None) -> None:
        self._specs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.inputs}
        self._limits = limits or GuardLimits()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(REJECTION_CHECKS, 0)
        self._accepted = 0
        self._expected = ", ".join(self._specs) or "(none declared)"

    @property
    def limits(self) -> GuardLimits:
        return self._limits

    @property
    def rejected(self) -> int:
        """Total number of rejected requests since start."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def rejections(self) -> dict[str, int]:
        """Rejected requests by failed check (keys are ``REJECTION_CHECKS``): JSON-able for the heartbeat."""
        with self._lock:
            return dict(self._counts)

    def note_rejected(self, check: str) -> None:
        """Count a rejection made elsewhere on the input path (``image`` decoding, ``ood`` with action
        ``reject``), so one counter covers every refused request."""
        if check not in self._counts:
            raise ValueError(f"unknown rejection check {check!r}; known: {', '.join(REJECTION_CHECKS)}")
        with self._lock:
            self._counts[check] += 1

    def _reject(self, check: str, message: str) -> InputRejected:
        with self._lock:
            self._counts[check] += 1
        return InputRejected(message)

    def check(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Return the validated inputs or raise ``InputRejected`` naming exactly what was wrong."""
        untyped: object = inputs  # callers outside the type checker (the service, the CLI) can pass anything
        if not isinstance(untyped, Mapping):
            got = type(untyped).__name__
            raise self._reject("type", f"inputs must be a mapping of name to array, got {got}")
        names = list(inputs)
        for name in names:
            if name not in self._specs:
                raise self._reject("name", f"unknown input {name!r} (expected: {self._expected})")
        for name in self._specs:
            if name not in inputs:
                raise self._reject("name", f"missing input {name!r} (expected: {self._expected})")

        arrays: dict[str, np.ndarray] = {}
        total = 0
        for name, spec in self._specs.items():
            array = self._check_structure(spec, inputs[name])
            total += int(array.nbytes)
            arrays[name] = array
        if total > self._limits.max_total_bytes:
            raise self._reject(
                "size", f"inputs total {total} bytes, over the limit of {self._limits.max_total_bytes} bytes"
            )
        # Only now, with the size bounded, scan the values.
        for name, spec in self._specs.items():
            self._check_values(spec, arrays[name])
        with self._lock:
            self._accepted += 1
        return {name: np.ascontiguousarray(array) for name, array in arrays.items()}

    def _check_structure(self, spec: TensorSpec, value: Any) -> np.ndarray:
        name = spec.name
        if not isinstance(value, np.ndarray):
            raise self._reject("type", f"input {name!r}: expected a numpy array, got {type(value).__name__}")
        if value.dtype.name != spec.dtype:
            got = value.dtype.name
            raise self._reject("dtype", f"input {name!r}: dtype {got} does not match {spec.dtype}")
        shape = tuple(int(d) for d in value.shape)
        declared = format_shape(spec.shape)
        if len(shape) > _MAX_RANK or len(shape) != len(spec.shape):
            raise self._reject(
                "shape", f"input {name!r}: shape {shape} does not match {declared}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if want is None:
                if got < 1:
                    raise self._reject("shape", f"input {name!r}: shape {shape} has an empty axis {axis}")
                if got > self._limits.max_dynamic_axis:
                    raise self._reject(
                        "shape", f"input {name!r}: shape {shape}: dynamic axis {axis} is {got}, over the "
                        f"limit of {self._limits.max_dynamic_axis}"
                    )
            elif got != want:
                raise self._reject("shape", f"input {name!r}: shape {shape} does not match {declared}")
        return value

    def _check_values(self, spec: TensorSpec, array: np.ndarray) -> None:
        if self._values_plainly_valid(spec, array):
            return
        name = spec.name
        floating = array.dtype.kind in "fc"
        if floating and not self._limits.allow_non_finite:
            finite = np.isfinite(array)
            if not finite.all():
                nan = int(np.isnan(array).sum())
                inf = int(array.size - int(finite.sum()) - nan)
                raise self._reject(
                    "finite", f"input {name!r}: {nan} NaN and {inf} Inf values "
                    f"(first at index {_first_index(~finite)})"
                )
        if spec.value_range is None or array.dtype == np.bool_:
            return
        low, high = spec.value_range
        outside = (array < low) | (array > high)
        if outside.any():
            raise self._reject(
                "range", f"input {name!r}: {int(outside.sum())} values outside the declared range "
                f"[{low:g}, {high:g}] (min {array.min():g}, max {array.max():g}, first at index "
                f"{_first_index(outside)})"
            )


    def _values_plainly_valid(self, spec: TensorSpec, array: np.ndarray) -> bool:
        """One min and one max answer both value checks for nearly every valid input (3x faster than the
        element-wise scans, which then run only to explain a rejection): NaN propagates into min/max and an
        infinity shows up in one of them."""
        if array.size == 0 or array.dtype.kind not in "fiu":
            return array.size == 0
        low, high = array.min(), array.max()
        if array.dtype.kind == "f" and not self._limits.allow_non_finite and not (
            np.isfinite(low) and np.isfinite(high)
        ):
            return False
        if spec.value_range is None:
            return True
        return bool(low >= spec.value_range[0] and high <= spec.value_range[1])


def validate_declarations(manifest: Manifest) -> None:
    """Check ``preprocess``, ``postprocess``, ``input_stats`` and ``defence`` of a manifest; the engine calls
    it at load.

    A declaration the engine cannot apply makes the bundle unusable, so it is refused as
    ``BundleRejected("malformed", ...)`` naming the key, instead of failing on the first request.
    """
    try:
        parse_preprocess(manifest)
        parse_postprocess(manifest)
        parse_input_stats(manifest)
        parse_defence(manifest)
    except ConfigError as exc:
        raise BundleRejected("malformed", f"manifest {exc}") from None
