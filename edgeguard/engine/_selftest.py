"""Self-test: does an accelerator reproduce the reference outputs within the manifest's tolerance?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import GoldenSample, Manifest, Tolerance

from ._backend import Backend, TensorInfo

__all__ = ["Sample", "compare_outputs", "reference_inputs", "samples_from_golden"]

# Dynamic spatial axes get this size in a synthetic reference input: a multiple of 32 that every common
# detector backbone (strides 8/16/32) accepts, and small enough to keep the self-test quick.
_DYNAMIC_AXIS = 64
_SEED = 20240601


@dataclass(frozen=True)
class Sample:
    """Inputs and the reference outputs an accelerator must reproduce."""

    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]


def samples_from_golden(golden: Sequence[GoldenSample]) -> tuple[Sample, ...]:
    return tuple(Sample(inputs=dict(g.inputs), outputs=dict(g.outputs)) for g in golden)


def reference_inputs(manifest: Manifest, backend: Backend) -> dict[str, np.ndarray]:
    """A deterministic input within each declared range, for bundles without golden vectors."""
    rng = np.random.default_rng(_SEED)
    specs = {s.name: s for s in manifest.inputs}
    out: dict[str, np.ndarray] = {}
    for info in backend.inputs:
        spec = specs.get(info.name)
        dtype = np.dtype(spec.dtype) if spec is not None else info.dtype
        declared: tuple[int | None, ...] = spec.shape if spec is not None else info.shape
        shape = tuple(_axis(i, d, info) for i, d in enumerate(declared))
        declared_range = spec.value_range if spec is not None else None
        lo, hi = declared_range if declared_range is not None else _default_range(dtype)
        if np.issubdtype(dtype, np.floating):
            out[info.name] = rng.uniform(lo, hi, size=shape).astype(dtype)
        elif dtype == np.bool_:
            out[info.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            out[info.name] = rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
    return out


def _axis(index: int, declared: int | None, info: TensorInfo) -> int:
    if declared is not None:
        return declared
    lib = info.shape[index] if index < len(info.shape) else None
    if lib is not None:
        return lib
    return 1 if index == 0 else _DYNAMIC_AXIS


def _default_range(dtype: np.dtype[Any]) -> tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(max(info.min, -128)), float(min(info.max, 127))
    return 0.0, 1.0


def compare_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                    tol: Tolerance) -> str | None:
    """None when ``got`` matches ``want`` (``|a-b| <= atol + rtol*|b|``, same NaN/Inf pattern), else why."""
    for name, expected in want.items():
        if name not in got:
            return f"output {name!r} missing"
        actual = np.asarray(got[name])
        if actual.shape != expected.shape:
            return f"output {name!r} shape {actual.shape} != reference {expected.shape}"
        b = np.asarray(expected)
        # float32 outputs are compared in float32 (its rounding, ~6e-8 relative, is far below any tolerance):
        # this avoids two float64 copies of every output, the largest part of a self-test's own cost.
        work = np.result_type(actual.dtype, b.dtype, np.float32)
        a = actual.astype(work, copy=False)
        b = b.astype(work, copy=False)
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        if not (fin_b.all() and fin_a.all()):
            if not np.array_equal(fin_a, fin_b):
                bad_a, bad_b = int((~fin_a).sum()), int((~fin_b).sum())
                return f"output {name!r} has {bad_a} non-finite values, reference {bad_b}"
            if not fin_b.any():
                continue
            a, b = a[fin_b], b[fin_b]
        err = np.subtract(a, b)
        np.abs(err, out=err)
        allowed = np.abs(b)
        allowed *= tol.rtol
        allowed += tol.atol
        bad = err > allowed
        if bad.any():
            worst = int(np.argmax(err - allowed))
            flat_err, flat_allowed = err.reshape(-1), allowed.reshape(-1)
            return (f"output {name!r} differs from the reference in {int(bad.sum())}/{bad.size} values "
                    f"(max |diff| {float(err.max()):.3g}, at worst {float(flat_err[worst]):.3g} > allowed "
                    f"{float(flat_allowed[worst]):.3g})")
    return None
