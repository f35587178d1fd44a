"""The engine: guard -> (preprocess) -> fast path -> (postprocess), with counters for the heartbeat."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeguard.bundle.manifest import GoldenSample, Manifest
from edgeguard.errors import AdversarialInput, BackendError, InputRejected
from edgeguard.profiles import EngineTuning, Profile, detect_profile

from ._backend import Backend
from ._fastpath import CandidateReport, FastPath
from ._open import BackendOpener, open_backend
from ._selftest import samples_from_golden
from ._stats import LatencyWindow
from .adversarial import SqueezeDetector
from .guard import GuardLimits, InputGuard, validate_declarations
from .ood import OodMonitor
from .postprocess import Postprocessor
from .preprocess import LetterboxTransform, Preprocessor

__all__ = ["Engine", "InferenceResult", "ModelSource"]


class _Once:
    """Call ``fn`` at most once, from whichever thread gets there first (load failure or standby thread)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class ModelSource(Protocol):
    """What the engine needs from an opened bundle (``edgeguard.bundle.OpenedBundle`` provides it)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def model(self) -> bytearray: ...

    @property
    def golden(self) -> Sequence[GoldenSample]: ...

    def wipe(self) -> None: ...


@dataclass(frozen=True)
class InferenceResult:
    """One inference: raw outputs, the post-processed result when declared, and where it ran."""

    outputs: dict[str, np.ndarray]
    post: dict[str, Any] | None
    latency_ms: float
    backend: str
    accelerator: str
    ood: str | None = None  # why the input looked out of distribution, when it did
    # The feature-squeezing score and verdict, when the manifest declares defence.adversarial:
    adversarial_score: float | None = None
    adversarial: bool | None = None

    def to_json(self, *, include_outputs: bool | None = None) -> dict[str, Any]:
        """JSON-able form; raw outputs are included when there is no post-processed result (or when asked)."""
        out: dict[str, Any] = {
            "latency_ms": round(self.latency_ms, 3),
            "backend": self.backend,
            "accelerator": self.accelerator,
        }
        if self.ood is not None:
            out["ood"] = self.ood
        if self.adversarial_score is not None:
            out["adversarial_score"] = self.adversarial_score
            out["adversarial"] = self.adversarial
        if self.post is not None:
            out["post"] = self.post
        if include_outputs or (include_outputs is None and self.post is None):
            out["outputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "data": v.tolist()}
                              for k, v in self.outputs.items()}
        return out


class Engine:
    """A loaded model on its self-tested fast path. Create with :meth:`Engine.load`."""

    def __init__(self, *, manifest: Manifest, fastpath: FastPath, profile: Profile,
                 guard_limits: GuardLimits | None = None) -> None:
        self.manifest = manifest
        self.profile = profile
        self._fast = fastpath
        self._guard = InputGuard(manifest, limits=guard_limits)
        self._ood = OodMonitor.from_manifest(manifest)
        self._adversarial = SqueezeDetector.from_manifest(manifest)
        self._pre = Preprocessor.from_manifest(manifest)
        self._post = Postprocessor.from_manifest(manifest)
        self._latency = LatencyWindow()
        self._lock = threading.Lock()
        self._count = 0
        self._failures = 0
        self._closed = False

    @classmethod
    def load(
        cls,
        opened: ModelSource,
        *,
        profile: Profile | None = None,
        tuning: EngineTuning | None = None,
        guard_limits: GuardLimits | None = None,
        opener: BackendOpener = open_backend,
        clock: Callable[[], float] = time.monotonic,
    ) -> Engine:
        """Pick the fast path for ``opened`` and wipe its plaintext (whether loading succeeds or not).

        ``profile`` defaults to the detected board's; ``tuning`` to the profile's ``[engine]`` table.
        ``opener`` and ``clock`` are seams for tests (a backend wrapper, a controlled clock).

        The engine is ready once the first candidate has passed its self-test. Standby candidates
        (``tuning.standby`` > 0) are then built on a background thread, and ``opened.wipe()`` runs when that
        thread ends (or ``close()`` stops it): the plaintext stays in memory, never on disk, for one more
        session creation. With ``standby = 0``, or when no candidate is left to try, it is wiped before
        this returns.
        """
        wipe = _Once(opened.wipe)
        try:
            manifest = opened.manifest
            validate_declarations(manifest)
            prof = profile if profile is not None else detect_profile()
            fast = FastPath(
                model_format=manifest.format,
                candidates=prof.candidates(manifest.format),
                model=opened.model,
                manifest=manifest,
                samples=samples_from_golden(opened.golden),
                tuning=tuning if tuning is not None else prof.engine,
                threads=prof.effective_threads,
                opener=opener,
                clock=clock,
                release=wipe,
            )
        except BaseException:
            wipe()
            raise
        try:
            return cls(manifest=manifest, fastpath=fast, profile=prof, guard_limits=guard_limits)
        except BaseException:
            fast.close()  # stops the standby build and releases the plaintext
            raise

    # --- inference ------------------------------------------------------------------------------------------

    def infer(self, inputs: Mapping[str, np.ndarray]) -> InferenceResult:
        """Guard, run on the fast path (falling back without losing the request), post-process."""
        return self._infer(inputs, None)

    def infer_image(self, image: np.ndarray | bytes) -> InferenceResult:
        """Preprocess a camera frame (HxWx3 uint8 RGB) or PNG/JPEG bytes as declared, then infer."""
        if self._pre is None:
            raise InputRejected(f"model {self.manifest.name!r} declares no image preprocessing; send tensors")
        prepared = self._pre(image)
        return self._infer(prepared.tensors, prepared.transform)

    def _infer(self, inputs: Mapping[str, np.ndarray],
               transform: LetterboxTransform | None) -> InferenceResult:
        if self._closed:
            raise BackendError("engine is closed")
        started = time.perf_counter()
        checked = self._guard.check(inputs)
        ood_reason: str | None = None
        if self._ood is not None:
            verdict = self._ood.check(checked)
            ood_reason = verdict.reason if verdict.flagged else None
        score: float | None = None
        flagged: bool | None = None
        try:
            if self._adversarial is None:
                outputs, backend = self._fast.run(checked)
            else:
                outputs, backend, score, flagged = self._run_detected(checked)
        except BackendError:
            with self._lock:
                self._failures += 1
            raise
        post = self._post(outputs, transform) if self._post is not None else None
        latency = (time.perf_counter() - started) * 1000.0
        self._latency.add(latency)
        with self._lock:
            self._count += 1
        return InferenceResult(outputs=outputs, post=post, latency_ms=latency, backend=backend.runtime,
                               accelerator=backend.label, ood=ood_reason, adversarial_score=score,
                               adversarial=flagged)

    def _run_detected(self, checked: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Backend,
                                                                        float, bool]:
        """Run with the feature-squeezing detector: the input and its squeezed versions (one batch when the
        declaration allows), the verdict counted, a ``reject`` refusal counted as a guard rejection."""
        assert self._adversarial is not None
        used: list[Backend] = []

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs, backend = self._fast.run(inputs)
            used.append(backend)
            return outputs

        try:
            outputs, verdict = self._adversarial.run(run, checked)
        except AdversarialInput:
            self._guard.note_rejected("adversarial")
            raise
        return outputs, used[0], verdict.score, verdict.adversarial

    # --- health ---------------------------------------------------------------------------------------------

    def try_promote(self) -> None:
        """Give demoted accelerators their self-test once the cool-down has passed (the service may call this
        from its heartbeat loop so promotion does not wait for the next request)."""
        self._fast.try_promote()

    def candidates(self) -> tuple[CandidateReport, ...]:
        return self._fast.report()

    def wait_standby(self, timeout: float | None = None) -> bool:
        """Wait until the fallback sessions built in the background exist (or failed); False on timeout.
        Reports that list every candidate (``doctor``) call this so none still shows ``loading``."""
        return self._fast.wait_standby(timeout)

    def health(self) -> dict[str, Any]:
        """Facts for the heartbeat (JSON-able)."""
        backend = self._fast.active_backend
        with self._lock:
            count, failures = self._count, self._failures
        degraded = self._fast.degraded_reason()
        return {
            "model": {"name": self.manifest.name, "version": self.manifest.version,
                      "sha256": self.manifest.payload_sha256},
            "profile": self.profile.name,
            "backend": backend.runtime if backend is not None else None,
            "accelerator": backend.label if backend is not None else None,
            "degraded": degraded is not None or backend is None,
            "degraded_reason": degraded if backend is not None else (degraded or "no working accelerator"),
            "candidates": [c.to_json() for c in self._fast.report()],
            "inferences": count,
            "backend_failures": failures,
            "demotions": self._fast.demotions,
            "promotions": self._fast.promotions,
            "latency_ms": self._latency.percentiles(),
            "rejected": self._guard.rejected + self._fast.request_failures,
            "rejections": {**self._guard.rejections(), "model": self._fast.request_failures},
            "ood": self._ood.counts() if self._ood is not None else {"checked": 0, "flagged": 0},
            "adversarial": (self._adversarial.counts() if self._adversarial is not None
                            else {"mode": "off", "checked": 0, "flagged": 0, "rejected": 0}),
            "load_ms": round(self._fast.load_ms, 3),
            "selftest_ms": round(self._fast.ready_selftest_ms, 3),  # the self-test inside load_ms
            # One run here, as the self-tests measured it: the service bounds a stuck inference by it.
            "selftest_run_ms": round(self._fast.slowest_run_ms, 3),
        }

    def close(self) -> None:
        self._closed = True
        self._fast.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
