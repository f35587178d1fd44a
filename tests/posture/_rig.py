"""A provisioned device on a hardened host, for the posture tests (see conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

from edgeguard.clock import ClockState
from edgeguard.posture import HostProbe, ScanReport, run_scan
from edgeguard.service.config import load_config
from tests.service._env import Device

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "firmware_hooks" / "edgeguard.service"
NOW = datetime.now(timezone.utc)


def synced_clock(state_dir: Path) -> ClockState:
    return ClockState(
        now=NOW,
        wall=NOW,
        floor=NOW - timedelta(days=1),
        floor_source="checkpoint",
        synchronised=True,
        problem=None,
    )


@dataclass
class Rig:
    """A provisioned device (the config, keys, tokens and hooks the service tests use) on a hardened host
    (fake /proc values that are outside a test's reach, the shipped unit, a synchronised clock).

    ``after``: edits applied to the files once they are written (modes, owners, extra token lines)."""

    root: Path
    probe: HostProbe
    link_extra: str = ""
    api_extra: str = ""
    extra: str = ""
    after: list[Callable[[Rig], None]] = field(default_factory=list)

    def scan(self) -> ScanReport:
        dev = Device(root=self.root, broker=SimpleNamespace(port=1883), port=8780)  # type: ignore[arg-type]
        dev.provision(b"", link_extra=self.link_extra, api_extra=self.api_extra, extra=self.extra)
        (self.root / "state").mkdir(mode=0o700, exist_ok=True)
        (self.root / "state").chmod(0o700)
        for edit in self.after:
            edit(self)
        return run_scan(load_config(self.root / "edgeguard.toml"), self.probe)

    def proc(self, name: str, value: str) -> None:
        path = self.root / "proc" / "sys" / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")


def make_rig(tmp_path: Path) -> Rig:
    proc = tmp_path / "proc"
    (proc / "sys").mkdir(parents=True)
    (proc / "swaps").write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    r = Rig(
        root=tmp_path,
        probe=HostProbe(
            proc=proc,
            sys_root=tmp_path / "sys",
            unit=lambda: UNIT,
            systemd_running=lambda: True,
            clock=synced_clock,
        ),
    )
    r.proc("fs.suid_dumpable", "0")
    r.proc("kernel.yama.ptrace_scope", "1")
    return r
