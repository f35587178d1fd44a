"""The README's newcomer path, run as written: the fenced ``sh`` blocks between the ``newcomer-path`` markers
of README.md, in order, in one bash, with a real service child process and real curl.

The commands are read from README.md at test time, so README and test cannot drift. They run in a scratch
directory that looks like the clone (``examples/`` and ``.venv`` link to the real ones)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- newcomer-path:begin -->", "<!-- newcomer-path:end -->"
API_PORT = 8780  # the port `edgeguard init` writes and the README's curl uses


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md needs exactly one newcomer path"
    path = text.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", path, flags=re.S | re.M)
    assert blocks, "no ```sh blocks between the newcomer-path markers"
    return blocks


def test_readme_has_the_whole_path() -> None:
    script = "\n".join(readme_commands())
    for step in ("edgeguard zoo fetch", "edgeguard init mydevice", "edgeguard pack", "--golden-from",
                 "edgeguard run -c mydevice/edgeguard.toml", "curl ", "edgeguard status -c mydevice"):
        assert step in script, step
    # Exactly two set-up commands at the top (demo and tests); the path comes after them.
    top = (ROOT / "README.md").read_text().split(BEGIN, 1)[0]
    assert re.findall(r"^bash tools/bootstrap\.sh \w+$", top, flags=re.M) == [
        "bash tools/bootstrap.sh demo",
        "bash tools/bootstrap.sh test",
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_readme_newcomer_path_runs_as_written(
    tmp_path: Path, yolov8n_path: Path, astronaut_png: Path, chelsea_png: Path
) -> None:
    del yolov8n_path, astronaut_png, chelsea_png  # in the zoo cache already: the README's fetches are quick
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the README path queries the service with curl)")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests do not run in a virtual environment ({venv}); the README activates one")
    if not _port_free(API_PORT):
        pytest.skip(f"127.0.0.1:{API_PORT} is in use; the README's device listens there")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(venv)
    script = "set -euo pipefail\n" + "\n".join(readme_commands())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    # Its own process group: whatever happens, the background service is stopped with the shell.
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when `kill %1` stopped it
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, f"README path failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"

    # The two curl answers are JSON lines with the detections the README promises.
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 2, out
    astronaut, cat = results
    assert [d["label"] for d in astronaut["post"]["detections"]] == ["FACE_FEMALE"], astronaut
    assert cat["post"]["detections"] == [], cat
    assert astronaut["model"] == {"name": "yolov8n", "version": 2}  # the model the newcomer sealed
    # `status --wait` and the final `status` both answered OK; the last one counted both inferences.
    oks = [line for line in out.splitlines() if line.startswith("OK: serving yolov8n v2 on ")]
    assert len(oks) == 2, out
    assert "inference  2 done" in out, out
    assert (tmp_path / "mydevice" / "tokens").stat().st_mode & 0o077 == 0
