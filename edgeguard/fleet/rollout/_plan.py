"""A rollout's plan and persisted state: waves from percentages, ``rollouts/<id>.json`` written atomically.

The file holds everything a resumed operator process needs (the contract's progress document plus what was
sent to whom); :meth:`Rollout.progress` is the part published on ``<prefix>/rollouts/<id>`` (docs/fleet.md).
Waves take devices in id order: the plan is the same every time it is made from the same inventory, and an
operator can tell from ``fleet rollout status`` which devices the canary is.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

__all__ = [
    "ROLLOUT_ID",
    "Rollout",
    "Settings",
    "Wave",
    "parse_percent",
    "parse_waves",
    "plan_waves",
    "rollout_path",
    "list_rollouts",
]

ROLLOUT_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_STATE = 64 * 1024 * 1024
RolloutState = Literal["running", "halted", "done", "aborted"]
WaveState = Literal["pending", "deploying", "probation", "passed", "failed"]
FINAL = ("halted", "done", "aborted")


def parse_percent(text: str) -> int:
    t = text.strip().removesuffix("%")
    if not t.isdigit() or not 1 <= int(t) <= 100:
        raise ConfigError(f"wave size {text[:20]!r}: a whole percentage 1..100 (e.g. 5%)")
    return int(t)


def parse_waves(canary: str, then: str) -> list[int]:
    """``--canary 5% --then 25%,100%`` -> [5, 25, 100]: cumulative shares of the target, strictly growing."""
    percents = [parse_percent(canary)] + [parse_percent(p) for p in then.split(",") if p.strip()]
    for a, b in itertools.pairwise(percents):
        if b <= a:
            raise ConfigError(f"wave percentages must increase: {a}% then {b}%")
    return percents


def plan_waves(devices: Sequence[str], percents: Sequence[int]) -> list[tuple[int, list[str]]]:
    """Cumulative percentages -> (percent, devices) per wave, devices in id order; each wave at least one
    device (rounded up) while devices remain; a wave that would be empty is left out."""
    ordered = sorted(devices)
    waves: list[tuple[int, list[str]]] = []
    taken = 0
    for p in percents:
        upto = min(len(ordered), max(1, math.ceil(len(ordered) * p / 100)))
        if upto > taken:
            waves.append((p, ordered[taken:upto]))
            taken = upto
    return waves


@dataclass
class Wave:
    index: int
    percent: int
    devices: list[str]
    state: WaveState = "pending"
    probation_until: float | None = None
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)
    # private to the operator (not in the published progress): what was sent, and where each device is
    sent: dict[str, float] = field(default_factory=dict)  # device -> wall time of its last deploy command
    nonces: dict[str, str] = field(default_factory=dict)  # device -> that command's nonce
    probation: dict[str, float] = field(default_factory=dict)  # device -> its probation_until

    def outcome(self, device: str) -> bool:
        return device in self.ok or device in self.failed

    def open_devices(self) -> list[str]:
        return [d for d in self.devices if not self.outcome(d)]

    def took_new(self) -> list[str]:
        """Devices of this wave running (or having committed) the new version, as far as we know."""
        return [d for d in self.devices if d in self.ok or (d in self.probation and d not in self.failed)]

    def progress(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "percent": self.percent,
            "devices": list(self.devices),
            "state": self.state,
            "probation_until": self.probation_until,
            "ok": list(self.ok),
            "failed": dict(self.failed),
            "rolled_back": list(self.rolled_back),
        }


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What each deploy command asks of a device, and the operator's bounds."""

    probation_s: int = 60
    max_error_rate: float = 0.05
    max_p95_ms: float | None = None
    answer_timeout_s: float = 300.0  # deploy sent -> answer (fetch + verify + self-test + switch)
    commit_grace_s: float = 60.0  # probation over -> committed seen (heartbeat or event)

    def __post_init__(self) -> None:
        if not 1 <= self.probation_s <= 7 * 86400:
            raise ConfigError("--probation: 1 s .. 7 days")
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError("--max-error-rate: 0..1")
        if self.max_p95_ms is not None and not 0 < self.max_p95_ms <= 3_600_000:
            raise ConfigError("--max-p95-ms: a positive number of milliseconds")
        if not 1 <= self.answer_timeout_s <= 86400 or not 1 <= self.commit_grace_s <= 86400:
            raise ConfigError("--answer-timeout / --commit-grace: 1 s .. 1 day")

    def deploy_args(self, *, sha256: str, size: int, rollout: str) -> dict[str, str]:
        args = {
            "sha256": sha256,
            "size": str(size),
            "source": "mqtt",
            "probation_s": str(self.probation_s),
            "max_error_rate": f"{self.max_error_rate:g}",
            "rollout": rollout,
        }
        if self.max_p95_ms is not None:
            args["max_p95_ms"] = f"{self.max_p95_ms:g}"
        return args


@dataclass
class Rollout:
    id: str
    model: str
    version: int
    sha256: str
    size: int
    bundle: str  # absolute path of the sealed bundle on the operator's machine
    group: str
    max_failures: int
    settings: Settings
    started: float
    waves: list[Wave]
    state: RolloutState = "running"
    failures: int = 0
    updated: float = 0.0
    reason: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def current(self) -> Wave | None:
        for w in self.waves:
            if w.state not in ("passed",):
                return w
        return None

    def progress(self) -> dict[str, Any]:
        """The contract's document on ``<prefix>/rollouts/<id>``."""
        return {
            "v": 1,
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "sha256": self.sha256,
            "group": self.group,
            "state": self.state,
            "max_failures": self.max_failures,
            "failures": self.failures,
            "started": self.started,
            "updated": self.updated,
            "reason": self.reason,
            "waves": [w.progress() for w in self.waves],
        }

    def to_json(self) -> dict[str, Any]:
        doc = self.progress()
        doc.update(
            size=self.size,
            bundle=self.bundle,
            settings=asdict(self.settings),
            waves=[asdict(w) for w in self.waves],
        )
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: Path) -> Rollout:
        try:
            if doc["v"] != 1:
                raise ValueError(f"version {doc['v']!r}")
            return cls(
                id=str(doc["id"]),
                model=str(doc["model"]),
                version=int(doc["version"]),
                sha256=str(doc["sha256"]),
                size=int(doc["size"]),
                bundle=str(doc["bundle"]),
                group=str(doc["group"]),
                max_failures=int(doc["max_failures"]),
                settings=Settings(**doc["settings"]),
                started=float(doc["started"]),
                waves=[Wave(**w) for w in doc["waves"]],
                state=doc["state"],
                failures=int(doc["failures"]),
                updated=float(doc["updated"]),
                reason=doc["reason"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"rollout state {path} is damaged ({type(exc).__name__}: {exc})") from None

    def save(self, root: Path) -> None:
        path = rollout_path(root, self.id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, json.dumps(self.to_json(), indent=1).encode() + b"\n", mode=0o600)

    @classmethod
    def load(cls, root: Path, rollout_id: str) -> Rollout:
        path = rollout_path(root, rollout_id)
        if not path.exists():
            raise ConfigError(f"no rollout {rollout_id!r} in {root / 'rollouts'}")
        data = read_checked(path, what="rollout state", limit=_MAX_STATE, error=ConfigError).data
        try:
            doc = json.loads(data)
        except ValueError:
            raise ConfigError(f"rollout state {path} is not JSON") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"rollout state {path} is not a JSON object")
        return cls.from_json(doc, path)


def rollout_path(root: Path, rollout_id: str) -> Path:
    if not ROLLOUT_ID.fullmatch(rollout_id):
        raise ConfigError(f"rollout id {rollout_id[:80]!r}: 1..64 of [A-Za-z0-9_.-]")
    return root / "rollouts" / f"{rollout_id}.json"


def list_rollouts(root: Path) -> list[Rollout]:
    d = root / "rollouts"
    if not d.is_dir():
        return []
    out = [Rollout.load(root, p.stem) for p in sorted(d.glob("*.json")) if ROLLOUT_ID.fullmatch(p.stem)]
    return sorted(out, key=lambda r: r.started)
