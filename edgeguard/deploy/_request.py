"""The ``deploy`` command's arguments (docs/commands.md): strings from a signed command, checked here."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeguard.errors import CommandRefused

__all__ = ["DeployRequest"]

_SHA = re.compile(r"[0-9a-f]{64}")
_ROLLOUT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_INT = re.compile(r"[1-9][0-9]{0,15}")
_KEYS = {"sha256", "size", "source", "probation_s", "max_error_rate", "max_p95_ms", "rollout"}


def _number(args: Mapping[str, str], key: str, lo: float, hi: float) -> float | None:
    text = args.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (lo <= value <= hi):  # also refuses NaN
        raise CommandRefused("malformed", f"deploy: {key} must be a number in [{lo:g}, {hi:g}]")
    return value


@dataclass(frozen=True)
class DeployRequest:
    sha256: str
    size: int
    source: Path | None  # None: MQTT chunks
    probation_s: float
    max_error_rate: float
    max_p95_ms: float | None
    rollout: str | None

    @classmethod
    def parse(
        cls, args: Mapping[str, str], *, max_bytes: int, default_probation_s: float, max_probation_s: float
    ) -> DeployRequest:
        unknown = set(args) - _KEYS
        if unknown:
            raise CommandRefused("malformed", f"deploy: unknown argument {sorted(unknown)[0][:40]!r}")
        sha = args.get("sha256", "")
        if not _SHA.fullmatch(sha):
            raise CommandRefused("malformed", "deploy: sha256 must be 64 lowercase hex digits")
        size_text = args.get("size", "")
        if not _INT.fullmatch(size_text):
            raise CommandRefused("malformed", "deploy: size must be a positive decimal integer")
        size = int(size_text)
        if size > max_bytes:
            raise CommandRefused("too large", f"deploy: bundle of {size} bytes over deploy.max_bundle_bytes "
                                              f"{max_bytes}")
        src = args.get("source", "")
        source: Path | None
        if src == "mqtt":
            source = None
        elif src.startswith("path:") and src[5:].startswith("/") and "\0" not in src and len(src) <= 4096:
            source = Path(src[5:])
        else:
            raise CommandRefused("malformed", "deploy: source must be mqtt or path:/absolute/path")
        rollout = args.get("rollout")
        if rollout is not None and not _ROLLOUT.fullmatch(rollout):
            raise CommandRefused("malformed", "deploy: rollout must be 1..64 of [A-Za-z0-9_.-]")
        probation = _number(args, "probation_s", 0.0, max_probation_s)
        rate = _number(args, "max_error_rate", 0.0, 1.0)
        p95 = _number(args, "max_p95_ms", 0.001, 3_600_000.0)
        return cls(
            sha256=sha,
            size=size,
            source=source,
            probation_s=default_probation_s if probation is None else probation,
            max_error_rate=0.05 if rate is None else rate,
            max_p95_ms=p95,
            rollout=rollout,
        )
