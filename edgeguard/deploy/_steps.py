"""Fault injection at the steps of a deploy, for the power-cut tests (``service.fault_injection = true``).

``EDGEGUARD_FAULT=deploy-pause:STEP`` makes the thread doing a deploy stop at STEP: it writes the marker file
``<state_dir>/deploy/paused-STEP`` and blocks forever, so a test can ``kill -9`` the whole service there and
restart it. ``mid-*`` steps first leave a half-written file exactly where a power cut inside that write would
(half a chunk in the partial file; half a temp file next to the record, as ``atomic_write`` leaves it).

Steps, in order: ``mid-chunk``, ``chunk-written``, ``fetched``, ``verified``, ``slot-written``,
``mid-record``, ``switched``, ``mid-commit``, ``committed``, ``floor-raised``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Final

__all__ = ["StepHook", "STEPS"]

STEPS: Final = (
    "mid-chunk",
    "chunk-written",
    "fetched",
    "verified",
    "slot-written",
    "mid-record",
    "switched",
    "mid-commit",
    "committed",
    "floor-raised",
)


class StepHook:
    def __init__(self, *, enabled: bool, state_dir: Path) -> None:
        value = os.environ.get("EDGEGUARD_FAULT", "") if enabled else ""
        step = value.removeprefix("deploy-pause:") if value.startswith("deploy-pause:") else None
        self.step = step if step in STEPS else None
        self._dir = Path(state_dir) / "deploy"

    def wants(self, step: str) -> bool:
        return self.step == step

    def at(self, step: str) -> None:
        """Stop here for good when the environment asks for this step."""
        if self.step != step:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / f"paused-{step}").write_bytes(b"")
        threading.Event().wait()  # never set: the test kills the service here

    def half_atomic_write(self, step: str, path: Path, data: bytes) -> None:
        """What a power cut in the middle of ``atomic_write(path, data)`` leaves, then stop."""
        if self.step != step:
            return
        fd, _tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        self.at(step)
