"""What a posture check reports: a finding with a severity, the evidence that shows it, and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = ["Severity", "SEVERITIES", "Finding", "ScanReport"]

Severity = Literal["info", "low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "low", "medium", "high", "critical")


@dataclass(frozen=True)
class Finding:
    """``check`` is a stable id (scripts and dashboards key on it); ``evidence`` never holds a secret."""

    check: str
    severity: Severity
    title: str
    evidence: str
    fix: str

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def to_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "severity": self.severity,
            "title": self.title,
            "evidence": self.evidence,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class ScanReport:
    at: datetime
    findings: tuple[Finding, ...]
    checks: tuple[str, ...] = field(default=())  # every check that ran, with or without a finding

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="info")

    @property
    def ok(self) -> bool:
        """Nothing above "low": the exit status of ``edgeguard scan`` is 0."""
        return SEVERITIES.index(self.worst) <= SEVERITIES.index("low")

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}

    def summary(self) -> dict[str, Any]:
        """For the heartbeat: small and bounded (ids, not texts)."""
        return {
            "at": self.at.isoformat(),
            "worst": self.worst,
            "counts": self.counts(),
            "above_low": sorted({f.check for f in self.findings if f.rank > SEVERITIES.index("low")}),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "ok": self.ok,
            "worst": self.worst,
            "checks": list(self.checks),
            "findings": [f.to_json() for f in sorted(self.findings, key=lambda f: (-f.rank, f.check))],
        }
