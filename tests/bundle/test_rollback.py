"""The rollback floor is written atomically: a crash between write and rename leaves the old floor intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeguard.bundle import RollbackFloor
from edgeguard.errors import ConfigError

_CRASH = """
import os, sys
from pathlib import Path
from edgeguard.bundle import RollbackFloor
real_replace = os.replace
def crash(*args, **kwargs):  # the temp file is written and fsynced; the process dies before the rename
    os._exit(9)
os.replace = crash
RollbackFloor(Path(sys.argv[1])).raise_to("model", int(sys.argv[2]))
"""


def test_floor_survives_crash_between_write_and_rename(tmp_path: Path) -> None:
    floor = RollbackFloor(tmp_path)
    assert floor.raise_to("model", 4)
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path), "9"], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in (tmp_path / "rollback").iterdir() if p.name != "model"]
    assert leftovers and all(n.startswith(".model.") for n in leftovers)  # the crash really was mid-write
    assert floor.get("model") == 4  # the old floor, whole
    assert floor.raise_to("model", 9) and floor.get("model") == 9  # and the next write still works


def test_failed_rename_cleans_up_and_keeps_old_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    floor = RollbackFloor(tmp_path)
    floor.raise_to("m", 1)

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgeguard._atomic.os.replace", boom)
    with pytest.raises(OSError):
        floor.raise_to("m", 2)
    monkeypatch.undo()
    assert floor.get("m") == 1
    assert [p.name for p in (tmp_path / "rollback").iterdir()] == ["m"]


def test_floor_only_goes_up_and_corruption_is_refused(tmp_path: Path) -> None:
    floor = RollbackFloor(tmp_path)
    assert floor.get("m") == 0
    assert floor.raise_to("m", 5) and not floor.raise_to("m", 3) and floor.get("m") == 5
    (tmp_path / "rollback" / "m").write_text("")
    with pytest.raises(ConfigError, match="corrupt"):
        floor.get("m")
    with pytest.raises(ValueError):
        floor.get("../escape")
