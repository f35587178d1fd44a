"""The device's security posture: ``edgeguard scan`` checks, signed advisories, and the service's monitor.

See docs/security.md for each control, each check, its severity and its test.
"""

from __future__ import annotations

from ._advisories import Advisory, AdvisoryError, read_advisories, sign_advisories
from ._checks import ADVISORY_FILE, CHECKS, run_scan
from ._findings import SEVERITIES, Finding, ScanReport, Severity
from ._host import HostProbe
from ._monitor import PostureMonitor

__all__ = [
    "ADVISORY_FILE",
    "Advisory",
    "AdvisoryError",
    "CHECKS",
    "Finding",
    "HostProbe",
    "PostureMonitor",
    "SEVERITIES",
    "ScanReport",
    "Severity",
    "read_advisories",
    "run_scan",
    "sign_advisories",
]
