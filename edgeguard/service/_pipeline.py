"""The worker's inference pipeline: request -> engine (guard inside) -> result -> outbox. The sources' sink.

The engine behind it can be swapped (SIGHUP reload) without dropping requests: each request takes a reference
to the engine current at its start and finishes on it; the old engine is closed once its last request is done.
Every request in flight is timed, so the liveness report can say "inference stalled" when one runs too long.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from edgeguard.bundle.manifest import Manifest
from edgeguard.engine.harden import result_json
from edgeguard.errors import AdversarialInput, InputRejected, ServiceUnavailable
from edgeguard.sources import InferenceRequest

__all__ = ["Pipeline", "EngineLike", "ResultLike", "ResultStore"]

_log = logging.getLogger("edgeguard.service")


class ResultLike(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class EngineLike(Protocol):
    """What the pipeline needs from :class:`edgeguard.engine.Engine` (tests pass fakes of their own seams)."""

    manifest: Manifest

    def infer(self, inputs: Any) -> Any: ...
    def infer_image(self, image: np.ndarray | bytes) -> Any: ...
    def health(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class ResultStore(Protocol):
    def put(self, payload: bytes, *, priority: bool = False, kind: str = "result") -> str: ...


class Pipeline:
    def __init__(
        self,
        *,
        engine: EngineLike | None,
        store: ResultStore,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._store = store
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._in_flight: dict[int, float] = {}
        self._users: dict[int, int] = {}  # id(engine) -> requests running on it
        self._retired: list[EngineLike] = []
        self._ids = itertools.count()
        self.accepting = engine is not None
        self.unavailable_reason = "no model loaded" if engine is None else ""
        self.completed = 0
        self.failed = 0
        # Where refusals by the model's adversarial-input detector go (the worker: link events, audited).
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        # Told of every request (latency ms, failed for a reason other than its input): a deploy's probation.
        self.observer: Callable[[float, bool], None] | None = None

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    def manifest(self) -> Manifest | None:
        engine = self._engine
        return engine.manifest if engine is not None else None

    def __call__(self, request: InferenceRequest) -> dict[str, Any]:
        with self._lock:
            engine = self._engine
            if not self.accepting or engine is None:
                raise ServiceUnavailable(self.unavailable_reason or "not accepting requests")
            rid = next(self._ids)
            self._in_flight[rid] = self._clock()
            self._users[id(engine)] = self._users.get(id(engine), 0) + 1
        try:
            if request.image is not None:
                result = engine.infer_image(request.image)
            else:
                assert request.tensors is not None
                result = engine.infer(request.tensors)
            # Output hardening declared in the signed manifest: every path a result leaves by (API answer,
            # outbox -> MQTT results, directory and serial sources) sees only this document.
            policy = getattr(engine.manifest, "output", None)  # None also for fakes without the field
            doc: dict[str, Any] = result.to_json() if policy is None else result_json(result, policy)
            if request.annotations:  # the site's fields (served_by, correlation id): not model output
                doc.update(request.annotations)
            doc.update(
                {
                    "source": request.source,
                    "correlation_id": request.correlation_id,
                    "model": {"name": engine.manifest.name, "version": engine.manifest.version},
                    "time": self._wall(),
                }
            )
            # Durable on return: only now may the caller be told the result exists.
            doc["id"] = self._store.put(json.dumps(doc, separators=(",", ":")).encode())
            with self._lock:
                self.completed += 1
            self._observe(rid, error=False)
            return doc
        except AdversarialInput as exc:
            with self._lock:
                self.failed += 1
            if self.on_event is not None:
                self.on_event("adversarial-input", {
                    "source": request.source, "correlation_id": request.correlation_id,
                    "model": {"name": engine.manifest.name, "version": engine.manifest.version},
                    "score": round(exc.score, 6), "threshold": exc.threshold})
            self._observe(rid, error=False)  # the input's fault, not the model's: no probation failure
            raise
        except Exception as exc:
            with self._lock:
                self.failed += 1
            self._observe(rid, error=not isinstance(exc, InputRejected))
            raise
        finally:
            with self._lock:
                del self._in_flight[rid]
                self._users[id(engine)] -= 1
                self._close_idle_retired()

    @contextlib.contextmanager
    def using(self) -> Iterator[EngineLike]:
        """The current engine, kept open until the block ends, like a request's (a reload closes it only
        afterwards): for work made of many passes, an explanation. Not counted in flight: the hang check
        bounds one inference, and an explanation is many."""
        with self._lock:
            engine = self._engine
            if not self.accepting or engine is None:
                raise ServiceUnavailable(self.unavailable_reason or "not accepting requests")
            self._users[id(engine)] = self._users.get(id(engine), 0) + 1
        try:
            yield engine
        finally:
            with self._lock:
                self._users[id(engine)] -= 1
                self._close_idle_retired()
    def _observe(self, rid: int, *, error: bool) -> None:
        observer = self.observer
        if observer is None:
            return
        with self._lock:
            started = self._in_flight.get(rid, self._clock())
        try:
            observer((self._clock() - started) * 1000.0, error)
        except Exception:  # a probation watcher must not fail a request
            _log.exception("request observer failed")

    def swap(self, engine: EngineLike) -> None:
        """Make ``engine`` current; the previous one finishes its requests, then closes."""
        with self._lock:
            old, self._engine = self._engine, engine
            self.accepting, self.unavailable_reason = True, ""
            if old is not None:
                self._retired.append(old)
            self._close_idle_retired()

    def unload(self, reason: str) -> None:
        """Stop serving the current engine (revoked signer, expired): new requests get ``reason``; requests
        already running on it finish, then it closes."""
        with self._lock:
            old, self._engine = self._engine, None
            self.accepting, self.unavailable_reason = False, reason
            if old is not None:
                self._retired.append(old)
            self._close_idle_retired()

    def _close_idle_retired(self) -> None:
        for old in list(self._retired):
            if self._users.get(id(old), 0) == 0:
                self._retired.remove(old)
                self._users.pop(id(old), None)
                try:
                    old.close()
                except Exception:
                    _log.exception("closing the previous engine failed")

    def stop_accepting(self, reason: str) -> None:
        with self._lock:
            self.accepting, self.unavailable_reason = False, reason

    def oldest_in_flight_s(self) -> float:
        with self._lock:
            if not self._in_flight:
                return 0.0
            return self._clock() - min(self._in_flight.values())

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def wait_idle(self, timeout: float) -> bool:
        end = self._clock() + timeout
        while self.in_flight() and self._clock() < end:
            time.sleep(0.02)
        return self.in_flight() == 0
