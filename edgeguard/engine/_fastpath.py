"""Fast-path selection, self-test, demotion and promotion.

At load the profile's candidates are walked in order: a candidate is used only when it is present, loads, and
reproduces the reference outputs (golden vectors, else the plain CPU kernels) within the manifest's tolerance.
``standby`` further candidates that pass are kept loaded, because the plaintext model is wiped after load and
no new session can be created later. Those standbys are built on a background thread once the active one has
passed, so they do not delay readiness; the plaintext is released (wiped) when that thread ends. At run time
a failing accelerator (exception, NaN/Inf where the reference had none, timeout) is demoted and the same
request is rerun on the next one (waiting for a standby still being built); after a cool-down the demoted
accelerator is self-tested again and promoted back when it passes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.errors import BackendError, InputRejected
from edgeguard.profiles import Accelerator, EngineTuning

from ._backend import Backend, one_line
from ._open import BackendOpener, open_backend, reference_accelerator, unavailable_reason
from ._selftest import Sample, compare_outputs, reference_inputs

__all__ = ["FastPath", "CandidateReport"]

_MAX_BACKOFF_FACTOR = 16


@dataclass(frozen=True)
class CandidateReport:
    """What happened to one candidate, for ``doctor`` and the heartbeat."""

    label: str
    kind: str
    status: str  # active | standby | loading | skipped | failed | hung | not tried
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


class FastPath:
    """The ordered accelerator chain for one loaded model. Thread-safe: runs are serialised; reports never
    wait for a run.

    With ``release`` the standby candidates are built on a background thread once the active one has passed
    its self-test, and ``release()`` is called exactly once when the plaintext ``model`` is no longer needed:
    before ``__init__`` returns (or raises) when nothing is left to build (``tuning.standby == 0``, no further
    candidate), else when the background build ends or ``close()`` stops it. Without ``release`` everything
    is built before ``__init__`` returns, so the caller may wipe the model right after.
    """

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
        release: Callable[[], None] | None = None,
    ) -> None:
        if not candidates:
            if release is not None:
                release()
            raise BackendError(f"the device profile lists no {model_format} accelerators")
        self._format = model_format
        self._tuning = tuning
        self._clock = clock
        self._lock = threading.RLock()  # slot states and counters: held briefly, never across a session call
        self._run_lock = threading.Lock()  # serialises runs (and promotion self-tests) among themselves
        self._changed = threading.Condition(self._lock)  # a background standby was published / build ended
        self._stats = threading.Lock()
        self._slots = [_Slot(accelerator=a, rank=i) for i, a in enumerate(candidates)]
        self._closing = False
        self._builder: threading.Thread | None = None
        # The reference session, kept for the candidate it is identical to (bundles without golden vectors).
        self._spare: tuple[Accelerator, Backend] | None = None
        self.demotions = 0
        self.request_failures = 0  # requests refused because the model, not the accelerator, failed on them
        self.promotions = 0
        self.selftest_ms = 0.0
        # The slowest single run the self-tests measured on this device: what one inference costs here, the
        # base of the service's bound for a stuck inference (a Pi Zero 2 may take seconds per run).
        self.slowest_run_ms = 0.0
        started = time.perf_counter()
        handed_off = False
        try:
            self._samples = tuple(samples) or self._reference_samples(model, manifest, threads, opener)
            self._finite = {name: bool(np.isfinite(np.asarray(v)).all())
                            for s in self._samples for name, v in s.outputs.items()}
            self._tolerance = manifest.golden_tolerance
            rest = self._select_active(model, threads, opener)
            if rest and release is None:
                self._fill_standby(rest, model, threads, opener)
            self._mark_ready(started)
            if rest and release is not None:
                for slot in rest:
                    slot.status, slot.reason = "loading", "standby: being built in the background"
                self._builder = threading.Thread(target=self._build_standby, name="eg-standby", daemon=False,
                                                 args=(rest, model, threads, opener, release))
                self._builder.start()
                handed_off = True
        except BaseException:
            for slot in self._slots:  # nothing loaded so far may outlive a failed load
                if slot.backend is not None:
                    slot.backend.close()
                    slot.backend = None
            raise
        finally:
            if not handed_off:
                self._drop_spare()
                if release is not None:
                    release()

    def _mark_ready(self, started: float) -> None:
        self.load_ms = (time.perf_counter() - started) * 1000.0  # until ready: background builds excluded
        with self._stats:
            self.ready_selftest_ms = self.selftest_ms  # the self-test time inside load_ms

    # --- load -----------------------------------------------------------------------------------------------

    def _reference_samples(self, model: bytes | bytearray, manifest: Manifest, threads: int,
                           opener: BackendOpener) -> tuple[Sample, ...]:
        # When a candidate is exactly the plain reference kernels (same kind, no options, same threads), the
        # reference session is opened under that candidate's label and kept as its backend: its outputs are
        # the reference by definition, so a second identical session would only repeat the same work.
        ref_acc = reference_accelerator(self._format)
        twin = next((s for s in self._slots if s.accelerator.kind == ref_acc.kind
                     and not s.accelerator.options and (s.accelerator.threads or threads) == threads), None)
        ref = opener(self._format, twin.accelerator if twin is not None else ref_acc, model, threads)
        try:
            inputs = reference_inputs(manifest, ref)
            t0 = time.perf_counter()
            outputs = ref.run(inputs)
            self._add_selftest((time.perf_counter() - t0) * 1000.0, runs=1)
        except BaseException:
            ref.close()
            raise
        if twin is not None:
            self._spare = (twin.accelerator, ref)
        else:
            ref.close()
        return (Sample(inputs=inputs, outputs=outputs),)

    def _add_selftest(self, ms: float, *, runs: int) -> None:
        with self._stats:
            self.selftest_ms += ms
            if runs:
                self.slowest_run_ms = max(self.slowest_run_ms, ms / runs)

    def _self_test(self, backend: Backend) -> str | None:
        t0 = time.perf_counter()
        runs = 0
        try:
            for i, sample in enumerate(self._samples):
                try:
                    runs += 1
                    got = backend.run(sample.inputs)
                except BackendError as exc:
                    return f"self-test run failed: {exc}"
                why = compare_outputs(got, sample.outputs, self._tolerance)
                if why is not None:
                    return f"disagrees with the reference on sample {i}: {why}"
            return None
        finally:
            self._add_selftest((time.perf_counter() - t0) * 1000.0, runs=runs)

    def _try(self, slot: _Slot, model: bytes | bytearray, threads: int,
             opener: BackendOpener) -> Backend | None:
        """Load and self-test one candidate; record why it was skipped. No lock held: the slow part."""
        spare = self._spare
        if spare is not None and spare[0] is slot.accelerator:
            self._spare = None
            return spare[1]  # the reference session itself: nothing to compare it with but itself
        absent = unavailable_reason(self._format, slot.accelerator)
        if absent is not None:
            slot.status, slot.reason = "skipped", f"absent: {absent}"
            return None
        try:
            backend = opener(self._format, slot.accelerator, model, threads)
        except BackendError as exc:
            slot.status, slot.reason = "skipped", f"load failed: {exc}"
            return None
        why = self._self_test(backend)
        if why is not None:
            backend.close()
            slot.status, slot.reason = "skipped", why
            return None
        return backend

    def _select_active(self, model: bytes | bytearray, threads: int,
                       opener: BackendOpener) -> list[_Slot]:
        """Make the first candidate that passes active; return the candidates left for the standby build."""
        for n, slot in enumerate(self._slots):
            backend = self._try(slot, model, threads, opener)
            if backend is None:
                continue
            slot.backend, slot.status, slot.reason = backend, "active", None
            self._best_rank = slot.rank
            rest = self._slots[n + 1:]
            if self._tuning.standby == 0:
                for other in rest:
                    other.status, other.reason = "not tried", "not needed: an earlier accelerator passed"
                return []
            return rest
        detail = "; ".join(f"{s.accelerator.label}: {s.reason}" for s in self._slots)
        raise BackendError(f"no accelerator loaded and passed the self-test ({detail})")

    def _fill_standby(self, rest: Sequence[_Slot], model: bytes | bytearray, threads: int,
                      opener: BackendOpener) -> None:
        ready = 0
        for slot in rest:
            if ready >= self._tuning.standby or self._closing:
                with self._lock:
                    slot.status = "not tried"
                    slot.reason = "closed" if self._closing else "not needed: an earlier accelerator passed"
                continue
            backend = self._try(slot, model, threads, opener)
            with self._changed:
                if backend is None:
                    continue
                if self._is_closing():  # close() was called while the session was being created
                    backend.close()
                    slot.status, slot.reason = "not tried", "closed"
                    continue
                slot.backend, slot.reason = backend, None
                # Published as standby; if every loaded accelerator failed meanwhile, it takes over at once.
                slot.status = "active" if self._idle() else "standby"
                ready += 1
                self._changed.notify_all()

    def _is_closing(self) -> bool:
        return self._closing

    def _idle(self) -> bool:
        """No accelerator is active or standby (all failed, hung or not loaded)."""
        return not any(s.status in ("active", "standby") for s in self._slots)

    def _build_standby(self, rest: Sequence[_Slot], model: bytes | bytearray, threads: int,
                       opener: BackendOpener, release: Callable[[], None]) -> None:
        # Hand the GIL straight back: Thread.start() waits for this thread to begin, and without this the new
        # thread would keep the GIL for a whole switch interval (5 ms) while the engine is finishing its load.
        time.sleep(0)
        try:
            self._fill_standby(rest, model, threads, opener)
        except BaseException as exc:  # never leave a slot "loading" forever, whatever went wrong
            with self._lock:
                for slot in rest:
                    if slot.status == "loading":
                        slot.status, slot.reason = "skipped", f"standby build failed: {one_line(exc)}"
        finally:
            del model  # this thread's reference; the owner's buffer is wiped by release()
            self._drop_spare()
            try:
                release()
            finally:
                with self._changed:
                    self._builder = None
                    self._changed.notify_all()

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare[1].close()

    @property
    def standby_pending(self) -> bool:
        """True while standby candidates are still being built in the background (plaintext still held)."""
        return self._builder is not None

    def wait_standby(self, timeout: float | None = None) -> bool:
        """Wait until the background standby build has ended; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._builder is None, timeout)

    # --- run ------------------------------------------------------------------------------------------------

    def _active(self) -> _Slot | None:
        return next((s for s in self._slots if s.status == "active"), None)

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Backend]:
        """Run on the active accelerator; on failure demote it and rerun the same inputs on the next one.

        A failure is blamed on the accelerator only when it also fails its self-test (or hangs); otherwise the
        request is refused with ``InputRejected`` and nothing is demoted.

        Runs are serialised by ``_run_lock`` (one session call at a time: a LiteRT interpreter is not
        thread-safe, and the profile sizes the threads for one run). The state lock is taken only for short
        bookkeeping, never across a session call or a self-test: :meth:`report` and :meth:`degraded_reason`,
        which the service's liveness beat reads, must never wait for an inference (on a slow board one run
        can outlast the liveness timeout).
        """
        with self._run_lock:
            self._maybe_promote()
            errors: list[str] = []
            waited = False
            while True:
                with self._lock:
                    slot = self._active()
                    if slot is None and self._builder is not None and not self._closing:
                        # The standby is still being built in the background: the request waits for it
                        # rather than failing (the build publishes it as active when nothing else is left),
                        # within run_timeout_ms when one is set.
                        limit_ms = self._tuning.run_timeout_ms
                        if not self._changed.wait(None if limit_ms is None else limit_ms / 1000.0):
                            why = "; ".join(errors) or self._why_none()
                            raise BackendError(f"no working accelerator left: {why}; the standby is still "
                                               f"being built (waited {limit_ms} ms)")
                        waited = True
                        continue
                    if slot is None:
                        why = "; ".join(errors) or self._why_none()
                        if waited:
                            why += f"; the standby built meanwhile did not help ({self._why_none()})"
                        raise BackendError(f"no working accelerator left: {why}")
                    backend = slot.backend
                assert backend is not None
                try:
                    outputs = self._run_on(slot, backend, inputs)
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
                        with self._lock:
                            self.request_failures += 1
                        raise InputRejected(f"the model cannot run this input ({slot.accelerator.label} "
                                            f"passes its self-test): {exc}") from None
                    errors.append(str(exc))
                    with self._lock:
                        self._demote(slot, str(exc), hung=hung)

    def _run_on(self, slot: _Slot, backend: Backend,
                inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        """Self-test the demoted accelerators whose cool-down has passed; the first that passes and ranks
        above the active one becomes active. Called with ``_run_lock`` held; the self-tests run without the
        state lock (they take as long as inferences)."""
        with self._lock:
            if not any(s.status == "failed" for s in self._slots):
                return  # the common case, on every request: nothing was demoted
            active = self._active()
            limit = active.rank if active is not None else len(self._slots)
            now = self._clock()
            due = [s for s in self._slots if s.rank < limit and s.status == "failed" and s.backend is not None
                   and now >= s.retry_at]
        for slot in due:
            backend = slot.backend
            if backend is None:
                continue
            why = self._self_test(backend)
            with self._lock:
                if slot.status != "failed" or slot.backend is not backend:
                    continue  # closed meanwhile
                if why is None:
                    active = self._active()
                    if active is not None:
                        active.status = "standby"
                    slot.status, slot.reason, slot.backoff_s = "active", None, 0.0
                    self.promotions += 1
                    return
                slot.reason = f"promotion self-test failed: {why}"
                slot.backoff_s = min(slot.backoff_s * 2, self._tuning.promote_after_s * _MAX_BACKOFF_FACTOR) \
                    or self._tuning.promote_after_s
                slot.retry_at = self._clock() + slot.backoff_s

    def try_promote(self) -> None:
        """Self-test demoted accelerators whose cool-down has passed (also done before each run)."""
        with self._run_lock:
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
        """Close every backend. A standby being built is waited for (a native session creation cannot be
        interrupted), then discarded; the plaintext is released before this returns."""
        with self._changed:
            self._closing = True
            builder = self._builder
            self._changed.notify_all()  # a request waiting for the standby gives up
        if builder is not None and builder is not threading.current_thread():
            builder.join()
        # A run in progress finishes first (as when runs held the state lock): its session is not closed
        # under it.
        with self._run_lock, self._lock:
            for slot in self._slots:
                if slot.executor is not None:
                    slot.executor.shutdown(wait=False)
                    slot.executor = None
                if slot.backend is not None:
                    slot.backend.close()
                    slot.backend = None
                if slot.status in ("active", "standby", "loading"):
                    slot.status, slot.reason = "not tried", "closed"
