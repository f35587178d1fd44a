"""The posture checks: each reads the config and the host (through :class:`HostProbe`) and returns findings.

A check never raises on what it inspects (a missing file, a tool that is not installed): that becomes a
finding or an "info" note. Evidence names paths, modes, owners, token *names* and versions, never a secret.
The severities and the reasoning behind each are listed in docs/security.md ("edgeguard scan").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ._config_checks import check_api_bind, check_broker, check_files, check_tokens
from ._findings import Finding, ScanReport, Severity
from ._host import HostProbe
from ._host_checks import (
    ADVISORY_FILE,
    check_advisories,
    check_clock,
    check_core_dumps,
    check_swap,
    check_systemd,
    check_watchdog,
)

if TYPE_CHECKING:  # the service imports this package: no import of it at run time
    from edgeguard.service.config import ServiceConfig

__all__ = ["run_scan", "CHECKS", "ADVISORY_FILE"]


CHECKS: dict[str, Callable[[ServiceConfig, HostProbe], Iterator[Finding]]] = {
    "broker": check_broker,
    "api-bind": check_api_bind,
    "api-tokens": check_tokens,
    "file-perms": check_files,
    "core-dumps": check_core_dumps,
    "swap": check_swap,
    "clock": check_clock,
    "watchdog": check_watchdog,
    "systemd": check_systemd,
    "advisories": check_advisories,
}


def run_scan(cfg: ServiceConfig, host: HostProbe | None = None) -> ScanReport:
    """Every check once, in a fixed order. A check that fails unexpectedly is itself a finding."""
    host = host or HostProbe()
    findings: list[Finding] = []
    for name, check in CHECKS.items():
        try:
            findings.extend(check(cfg, host))
        except Exception as exc:
            findings.append(
                Finding(
                    name,
                    "medium",
                    f"check {name} could not run",
                    f"{type(exc).__name__}: {exc}",
                    "report this as a bug in EdgeGuard",
                )
            )
    severity_order: tuple[Severity, ...] = ("critical", "high", "medium", "low", "info")
    findings.sort(key=lambda f: (severity_order.index(f.severity), f.check))
    return ScanReport(at=datetime.now(timezone.utc), findings=tuple(findings), checks=tuple(CHECKS))
