"""docs/fleet.md, run as written: every `edgeguard` command of its walkthrough (the ```sh blocks), in order,
must succeed. Only what a test machine cannot do is changed: paths under /root and /etc go to the test
directory, `provision` gets `--root`, the model is the tests' tiny one; `mosquitto`/`systemctl` lines are
left to test_provision_broker.py, which runs the same commands against a real broker and device service."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fleet._fleet import ok
from tests.service._env import TINY_META, tiny_onnx

DOC = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"


def _walkthrough() -> list[str]:
    text = DOC.read_text().split("## The provisioning archive")[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_walkthrough_in_docs_fleet_md_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov8n.onnx").write_bytes(tiny_onnx())
    (tmp_path / "yolo-meta.json").write_text(json.dumps(TINY_META))
    lines = _walkthrough()
    ran = []
    key_id = None
    for line in lines:
        line = line.split("  #")[0].strip()
        if line.startswith("printf"):
            subprocess.run(["bash", "-c", line], check=True, cwd=tmp_path)
            continue
        if not line.startswith("edgeguard "):
            assert line.split()[0] in ("mosquitto", "systemctl"), line
            continue
        line = line.replace("/root/enroll", str(tmp_path / "enroll")).replace(
            "/etc/mosquitto/edgeguard", str(tmp_path / "mosquitto")
        )
        argv = shlex.split(line)[1:]
        if key_id is not None:
            argv = [key_id if a == "FLEET_KEY_ID" else a for a in argv]
        if argv[0] == "provision":
            if not Path(argv[1]).exists():  # "copy the archive to the board"
                shutil.copy(tmp_path / "plant-a/archives" / argv[1], argv[1])
            argv += ["--root", str(tmp_path / "board" / Path(argv[1]).stem)]
        out = ok(*argv)
        ran.append(argv[:2])
        m = re.search(r"fleet key id ([0-9a-f]{16})", out)
        if m:
            key_id = m.group(1)
    assert ["fleet", "init"] in ran and ["fleet", "seal"] in ran and ["enroll", "--id"] in ran
    assert len(ran) >= 11, ran
    inv = json.loads((tmp_path / "plant-a/inventory.json").read_text())
    assert inv["devices"]["cam-02"]["state"] == "revoked"
    assert sorted(inv["devices"]) == ["cam-01", "cam-02", "cam-03", "cam-04", "cam-07"]
    assert (tmp_path / "board/cam-01/etc/edgeguard/edgeguard.toml").exists()
    assert (tmp_path / "board/cam-07/etc/edgeguard/device.key").read_bytes() == (
        tmp_path / "enroll/device.key"
    ).read_bytes()
    assert "crlfile" in (tmp_path / "mosquitto/mosquitto.conf").read_text()
