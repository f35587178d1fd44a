"""Fast-path selection, self-test, demotion and promotion.

At load the profile's candidates are walked in order: a candidate is used only when it is present, loads, and
reproduces the reference outputs (golden vectors, else the plain CPU kernels) within the manifest's tolerance.
``standby`` further candidates that pass are kept loaded, because the plaintext model is wiped after load and
no new session can be created later. At run time a failing accelerator (exception, NaN/Inf where the reference
had none, timeout) is demoted and the same request is rerun on the next one; after a cool-down the demoted
accelerator is self-tested again and promoted back when it passes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import BackendError, InputRejected
from edgeguard.profiles import Accelerator, EngineTuning

from ._backend import Backend
from ._open import BackendOpener, open_backend, reference_accelerator, unavailable_reason
from ._selftest import Sample, compare_outputs, reference_inputs

__all__ = ["FastPath", "CandidateReport"]

_MAX_BACKOFF_FACTOR = 16


@dataclass(frozen=True)
class CandidateReport:
    """What happened to one candidate, for ``doctor`` and the heartbeat."""

    label: str
    kind: str
    status: str  # active | standby | skipped | failed | hung | not tried
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "status": self.status, "reason": self.reason}


@dataclass
class _Slot:
    accelerator: Accelerator
    rank: int
    status: str = "not tried"
    reason: str | None = None
    backend: Backend | None = None
    executor: ThreadPoolExecutor | None = None
    retry_at: float = 0.0
    backoff_s: float = 0.0
    failures: int = field(default=0)


class FastPath:
    """The ordered accelerator chain for one loaded model. Thread-safe: runs are serialised."""

    def __init__(
        self,
        *,
        model_format: str,
        candidates: Sequence[Accelerator],
        model: bytes | bytearray,
        manifest: Manifest,
        samples: Sequence[Sample],
        tuning: EngineTuning,
        threads: int,
        opener: BackendOpener = open_backend,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not candidates:
            raise BackendError(f"the device profile lists no {model_format} accelerators")
        self._format = model_format
        self._tuning = tuning
        self._clock = clock
        self._lock = threading.RLock()
        self._slots = [_Slot(accelerator=a, rank=i) for i, a in enumerate(candidates)]
        self.demotions = 0
        self.request_failures = 0  # requests refused because the model, not the accelerator, failed on them
        self.promotions = 0
        self.selftest_ms = 0.0
        started = time.perf_counter()
        self._samples = tuple(samples) or self._reference_samples(model, manifest, threads, opener)
        self._finite = {name: bool(np.isfinite(np.asarray(v)).all())
                        for s in self._samples for name, v in s.outputs.items()}
        self._tolerance = manifest.golden_tolerance
        self._select(model, threads, opener)
        self.load_ms = (time.perf_counter() - started) * 1000.0

    # --- load -----------------------------------------------------------------------------------------------

    def _reference_samples(self, model: bytes | bytearray, manifest: Manifest, threads: int,
                           opener: BackendOpener) -> tuple[Sample, ...]:
        ref = opener(self._format, reference_accelerator(self._format), model, threads)
        try:
            inputs = reference_inputs(manifest, ref)
            t0 = time.perf_counter()
            outputs = ref.run(inputs)
            self.selftest_ms += (time.perf_counter() - t0) * 1000.0
        finally:
            ref.close()
        return (Sample(inputs=inputs, outputs=outputs),)

    def _self_test(self, backend: Backend) -> str | None:
        t0 = time.perf_counter()
        try:
            for i, sample in enumerate(self._samples):
                try:
                    got = backend.run(sample.inputs)
                except BackendError as exc:
                    return f"self-test run failed: {exc}"
                why = compare_outputs(got, sample.outputs, self._tolerance)
                if why is not None:
                    return f"disagrees with the reference on sample {i}: {why}"
            return None
        finally:
            self.selftest_ms += (time.perf_counter() - t0) * 1000.0

    def _select(self, model: bytes | bytearray, threads: int, opener: BackendOpener) -> None:
        ready = 0
        for slot in self._slots:
            if ready > self._tuning.standby:  # the active one plus `standby` fallbacks are loaded
                slot.status, slot.reason = "not tried", "not needed: an earlier accelerator passed"
                continue
            absent = unavailable_reason(self._format, slot.accelerator)
            if absent is not None:
                slot.status, slot.reason = "skipped", f"absent: {absent}"
                continue
            try:
                backend = opener(self._format, slot.accelerator, model, threads)
            except BackendError as exc:
                slot.status, slot.reason = "skipped", f"load failed: {exc}"
                continue
            why = self._self_test(backend)
            if why is not None:
                backend.close()
                slot.status, slot.reason = "skipped", why
                continue
            slot.backend = backend
            slot.status, slot.reason = ("active" if ready == 0 else "standby"), None
            ready += 1
        if ready == 0:
            detail = "; ".join(f"{s.accelerator.label}: {s.reason}" for s in self._slots)
            raise BackendError(f"no accelerator loaded and passed the self-test ({detail})")
        self._best_rank = next(s.rank for s in self._slots if s.status == "active")

    # --- run ------------------------------------------------------------------------------------------------

    def _active(self) -> _Slot | None:
        return next((s for s in self._slots if s.status == "active"), None)

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Backend]:
        """Run on the active accelerator; on failure demote it and rerun the same inputs on the next one.

        A failure is blamed on the accelerator only when it also fails its self-test (or hangs); otherwise the
        request is refused with ``InputRejected`` and nothing is demoted.
        """
        with self._lock:
            self._maybe_promote()
            errors: list[str] = []
            while True:
                slot = self._active()
                if slot is None:
                    why = "; ".join(errors) or self._why_none()
                    raise BackendError(f"no working accelerator left: {why}")
                backend = slot.backend
                assert backend is not None
                try:
                    outputs = self._run_on(slot, inputs)
                    bad = self._non_finite(outputs)
                    if bad is not None:
                        raise BackendError(f"{slot.accelerator.label}: {bad}")
                    return outputs, backend
                except BackendError as exc:
                    hung = isinstance(exc.__cause__, FutureTimeout)
                    if not hung and self._self_test(backend) is None:
                        # The accelerator still reproduces the golden outputs: this request is what fails
                        # (e.g. a dynamic shape the graph cannot take). Demoting would let one bad request
                        # knock out every accelerator in turn.
                        self.request_failures += 1
                        raise InputRejected(f"the model cannot run this input ({slot.accelerator.label} "
                                            f"passes its self-test): {exc}") from None
                    errors.append(str(exc))
                    self._demote(slot, str(exc), hung=hung)

    def _run_on(self, slot: _Slot, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        backend = slot.backend
        assert backend is not None
        timeout_ms = self._tuning.run_timeout_ms
        if timeout_ms is None:
            return backend.run(inputs)
        # A native call cannot be interrupted: it runs on the slot's own thread and, when it overruns, the
        # request moves on and the whole backend (thread included) is abandoned.
        if slot.executor is None:
            slot.executor = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix=f"eg-{slot.accelerator.label}")
        future = slot.executor.submit(backend.run, inputs)
        try:
            return future.result(timeout=timeout_ms / 1000.0)
        except FutureTimeout as exc:
            raise BackendError(f"{slot.accelerator.label}: run exceeded {timeout_ms} ms") from exc

    def _non_finite(self, outputs: Mapping[str, np.ndarray]) -> str | None:
        for name, value in outputs.items():
            arr = np.asarray(value)
            if self._finite.get(name, False) and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                return f"output {name!r} has NaN/Inf where the reference had none"
        return None

    def _demote(self, slot: _Slot, reason: str, *, hung: bool) -> None:
        self.demotions += 1
        slot.failures += 1
        slot.reason = reason
        slot.backoff_s = max(self._tuning.promote_after_s, slot.backoff_s)
        slot.retry_at = self._clock() + slot.backoff_s
        if hung:
            # The stuck call still owns the session; it can never be trusted (or recreated: plaintext wiped).
            slot.status = "hung"
            if slot.executor is not None:
                slot.executor.shutdown(wait=False)
                slot.executor = None
            slot.backend = None
        else:
            slot.status = "failed"
        nxt = next((s for s in self._slots if s.status == "standby"), None)
        if nxt is not None:
            nxt.status = "active"

    def _maybe_promote(self) -> None:
        active = self._active()
        limit = active.rank if active is not None else len(self._slots)
        now = self._clock()
        for slot in self._slots:
            if slot.rank >= limit:
                break
            if slot.status != "failed" or slot.backend is None or now < slot.retry_at:
                continue
            why = self._self_test(slot.backend)
            if why is None:
                if active is not None:
                    active.status = "standby"
                slot.status, slot.reason, slot.backoff_s = "active", None, 0.0
                self.promotions += 1
                return
            slot.reason = f"promotion self-test failed: {why}"
            slot.backoff_s = min(slot.backoff_s * 2, self._tuning.promote_after_s * _MAX_BACKOFF_FACTOR) or \
                self._tuning.promote_after_s
            slot.retry_at = now + slot.backoff_s

    def try_promote(self) -> None:
        """Self-test demoted accelerators whose cool-down has passed (also done before each run)."""
        with self._lock:
            self._maybe_promote()

    def _why_none(self) -> str:
        return "; ".join(f"{s.accelerator.label}: {s.status} ({s.reason})" for s in self._slots)

    # --- reporting ------------------------------------------------------------------------------------------

    @property
    def active_backend(self) -> Backend | None:
        slot = self._active()
        return slot.backend if slot is not None else None

    def degraded_reason(self) -> str | None:
        with self._lock:
            active = self._active()
            if active is not None and active.rank <= self._best_rank:
                return None
            failed = [s for s in self._slots if s.status in ("failed", "hung") and
                      (active is None or s.rank < active.rank)]
            if not failed:
                return None
            first = failed[0]
            return f"{first.accelerator.label} demoted: {first.reason}"

    def report(self) -> tuple[CandidateReport, ...]:
        with self._lock:
            return tuple(CandidateReport(s.accelerator.label, s.accelerator.kind, s.status, s.reason)
                         for s in self._slots)

    def close(self) -> None:
        with self._lock:
            for slot in self._slots:
                if slot.executor is not None:
                    slot.executor.shutdown(wait=False)
                    slot.executor = None
                if slot.backend is not None:
                    slot.backend.close()
                    slot.backend = None
                if slot.status in ("active", "standby"):
                    slot.status, slot.reason = "not tried", "closed"
