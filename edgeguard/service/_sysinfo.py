"""Board facts for the heartbeat: CPU temperature, load, memory, disk (a missing fact is None)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["system_facts", "cpu_temp_c"]


def cpu_temp_c() -> float | None:
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            return round(int((zone / "temp").read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    return None


def _mem() -> dict[str, int] | None:
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
        )
        return {
            "total_kb": int(fields["MemTotal"].split()[0]),
            "available_kb": int(fields["MemAvailable"].split()[0]),
        }
    except (OSError, KeyError, ValueError):
        return None


def system_facts(state_dir: Path) -> dict[str, Any]:
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        du = shutil.disk_usage(state_dir)
        disk: dict[str, int] | None = {"total": du.total, "free": du.free}
    except OSError:
        disk = None
    return {"cpu_temp_c": cpu_temp_c(), "load": load, "memory": _mem(), "disk": disk}
