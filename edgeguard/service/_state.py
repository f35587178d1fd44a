"""The supervisor's persistent record: restarts, reasons, MTBF and MTTR, kept across restarts (atomic writes).

MTBF is the worker's accumulated serving time divided by the number of failures. MTTR is the mean time from
the moment the worker stopped being useful (its last good liveness for a hang, the exit for a crash) to the
moment its replacement reported ready. The worker reads this file for the heartbeat.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write

__all__ = ["SupervisorState", "Failure", "read_state", "write_state"]

MAX_HISTORY = 50


@dataclass
class Failure:
    at: float  # wall clock
    reason: str  # "crash: exit code 70", "crash: signal 9", "hang: no liveness for 10.0 s", "start timeout"
    mttr_s: float | None = None  # filled in when the replacement reports ready


@dataclass
class SupervisorState:
    first_start: float = 0.0
    starts: int = 0  # worker processes started
    failures: int = 0
    up_s: float = 0.0  # accumulated time the worker was ready
    repair_s: float = 0.0  # accumulated recovery time of repaired failures
    repaired: int = 0
    safe_state: bool = False
    safe_reason: str | None = None
    watchdogs: list[str] = field(default_factory=list)
    history: list[Failure] = field(default_factory=list)

    @property
    def mtbf_s(self) -> float | None:
        return round(self.up_s / self.failures, 3) if self.failures else None

    @property
    def mttr_s(self) -> float | None:
        return round(self.repair_s / self.repaired, 3) if self.repaired else None

    def record_failure(self, *, at: float, reason: str) -> Failure:
        f = Failure(at=at, reason=reason)
        self.failures += 1
        self.history.append(f)
        del self.history[:-MAX_HISTORY]
        return f

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mtbf_s"] = self.mtbf_s
        d["mttr_s"] = self.mttr_s
        d["restarts"] = max(0, self.starts - 1)
        d["last_reason"] = self.history[-1].reason if self.history else None
        return d

    def heartbeat_view(self) -> dict[str, Any]:
        d = self.to_json()
        return {
            k: d[k]
            for k in (
                "restarts",
                "failures",
                "mtbf_s",
                "mttr_s",
                "last_reason",
                "safe_state",
                "safe_reason",
                "watchdogs",
            )
        } | {"recent": [asdict(f) for f in self.history[-5:]]}


def read_state(path: Path) -> SupervisorState:
    """The stored state, or a fresh one when the file is missing or unreadable (never fatal)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        history = [Failure(**h) for h in raw.pop("history", [])]
        for derived in ("mtbf_s", "mttr_s", "restarts", "last_reason"):
            raw.pop(derived, None)
        return SupervisorState(**raw, history=history)
    except (OSError, ValueError, TypeError):
        return SupervisorState()


def write_state(path: Path, state: SupervisorState) -> None:
    """Temp file in the same directory, fsync, os.replace: a power cut leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state.to_json(), indent=1).encode())
