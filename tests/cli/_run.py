"""`edgeguard ...` as a real child process: exit code, stdout, stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def eg(*args: object, cwd: Path, timeout: float = 120) -> Result:
    env = dict(os.environ, EDGEGUARD_DEBUG="0")
    p = subprocess.run(
        [sys.executable, "-m", "edgeguard", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def one_line_error(r: Result, code: int, *needles: str) -> None:
    assert r.code == code, r
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    for needle in needles:
        assert needle in lines[0], lines[0]
