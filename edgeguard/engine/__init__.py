"""The inference engine: backends, self-tested fast-path selection with fallback, input guard, processing.

    engine = Engine.load(open_bundle(...), profile=get_profile("raspberry-pi-5"))
    result = engine.infer({"images": tensor})      # or engine.infer_image(png_bytes)
    engine.health()                                # for the heartbeat

See docs/engine.md.
"""

from __future__ import annotations

from ._backend import Backend, TensorInfo
from ._cache_dirs import CacheDir, profile_cache_dirs
from ._engine import Engine, InferenceResult, ModelSource
from ._fastpath import CandidateReport, FastPath
from ._open import BackendOpener, open_backend, reference_accelerator, unavailable_reason
from ._selftest import Sample, compare_outputs
from .guard import GuardLimits, InputGuard

__all__ = [
    "Backend",
    "BackendOpener",
    "CacheDir",
    "CandidateReport",
    "Engine",
    "FastPath",
    "GuardLimits",
    "InferenceResult",
    "InputGuard",
    "ModelSource",
    "Sample",
    "TensorInfo",
    "profile_cache_dirs",
    "compare_outputs",
    "open_backend",
    "reference_accelerator",
    "unavailable_reason",
]
