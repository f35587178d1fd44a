"""Facts about the host the scan needs, each behind a seam so tests can plant a weakness or remove it.

Everything here is read-only and bounded: small files under ``/proc`` and ``/sys``, the installed unit
file, one ``systemd-analyze security`` run (with a timeout) where systemd manages the host.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeguard._hardening import ProcessHardening
from edgeguard.clock import ClockState, TrustedClock

__all__ = ["HostProbe", "Swap", "UNIT_PATHS", "read_swaps", "analyze_security", "installed_version"]

UNIT_PATHS = (
    Path("/etc/systemd/system/edgeguard.service"),
    Path("/usr/lib/systemd/system/edgeguard.service"),
    Path("/lib/systemd/system/edgeguard.service"),
)


@dataclass(frozen=True)
class Swap:
    device: str
    kind: str  # "zram" (RAM, never on disk), "encrypted" (dm-crypt), "plain"


def _read(path: Path, limit: int = 65536) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def read_swaps(proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> tuple[Swap, ...] | None:
    """Active swap areas and whether their pages could reach a disk in clear; None if unknown."""
    text = _read(proc / "swaps")
    if text is None:
        return None
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if not parts:
            continue
        device = parts[0]
        name = Path(device).name
        if name.startswith("zram"):
            kind = "zram"
        elif name.startswith("dm-") and (_read(sys_root / "block" / name / "dm" / "uuid") or "").startswith(
            "CRYPT-"
        ):
            kind = "encrypted"
        else:
            kind = "plain"  # a partition, a file on a file system, or a device mapper target without crypt
        out.append(Swap(device, kind))
    return tuple(out)


_SCORE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def analyze_security(unit: Path | None) -> float | None:
    """``systemd-analyze security`` exposure score of the unit (0 best .. 10 worst); None where it cannot
    be had. Offline on the unit file, so it scores what is installed, also where systemd is not PID 1."""
    tool = shutil.which("systemd-analyze")
    if tool is None or unit is None:
        return None
    try:
        p = subprocess.run(
            [tool, "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,  # the score is printed whatever the exit status
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _SCORE.search(p.stdout)
    return float(m.group(1)) if m else None


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dependencies() -> tuple[str, ...]:
    """EdgeGuard and the distributions it requires (names only, markers ignored)."""
    try:
        reqs = importlib.metadata.requires("edgeguard") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    names = {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
    return ("edgeguard", *sorted(n for n in names if n))


def _clock_state(state_dir: Path) -> ClockState:
    return TrustedClock(state_dir=state_dir).state()


def _first_unit() -> Path | None:
    return next((p for p in UNIT_PATHS if p.is_file()), None)


@dataclass(frozen=True)
class HostProbe:
    """Where the scan looks. Defaults read the real host; tests replace single fields.

    ``process``: the hardening state of the process that holds plaintext, when the scan runs inside it
    (the worker); the CLI leaves it None and judges the kernel settings and the unit instead.
    """

    proc: Path = Path("/proc")
    sys_root: Path = Path("/sys")
    unit: Callable[[], Path | None] = _first_unit
    systemd_running: Callable[[], bool] = lambda: Path("/run/systemd/system").is_dir()
    security_score: Callable[[Path | None], float | None] = analyze_security
    clock: Callable[[Path], ClockState] = field(default=_clock_state)
    process: ProcessHardening | None = None
    mlock: str | None = None  # the worker's mlock verdict ("ok" or why not)
    packages: Callable[[], tuple[str, ...]] = _dependencies
    version: Callable[[str], str | None] = installed_version
    under_systemd: bool = False  # the scanning process was started by systemd (NOTIFY_SOCKET set)

    def sysctl(self, name: str) -> str | None:
        text = _read(self.proc / "sys" / name.replace(".", "/"), 4096)
        return None if text is None else text.strip()
