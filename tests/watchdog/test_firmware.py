"""The MCU firmware's portable protocol code, compiled on the host, against the shared test vectors; and the
systemd unit checked by systemd-analyze. Both skip (with the reason) where the tool does not exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FW = ROOT / "firmware_hooks" / "mcu_watchdog"


def test_firmware_protocol_matches_vectors(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    exe = tmp_path / "egwd_host"
    subprocess.run(
        [
            cc,
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(exe),
            str(FW / "host_test.c"),
            str(FW / "egwd_protocol.c"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    v = json.loads((FW / "test_vectors.json").read_text())
    lines = [f"crc {c['data_hex'] or '-'} {c['crc']}" for c in v["crc16_ccitt_false"]]
    lines += [f"cobs {c['raw_hex'] or '-'} {c['encoded_hex']}" for c in v["cobs"]]
    lines += [f"frame {c['payload_hex']} {c['frame_hex']}" for c in v["frames"]]
    p = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout
    n = len(lines) + 7  # plus the state-machine checks
    assert p.stdout.strip() == f"{n} checks, 0 failures"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # The entry point of the environment running the tests (a venv's bin/ need not be on PATH).
    beside = Path(sys.executable).with_name("edgeguard")
    exe = str(beside) if beside.exists() else shutil.which("edgeguard")
    assert exe is not None, "the edgeguard entry point is not installed"
    unit = (ROOT / "firmware_hooks" / "edgeguard.service").read_text()
    for required in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=",
        "LoadCredential=device-key:",
        "LoadCredential=api-tokens:",
        "DeviceAllow=/dev/watchdog",
    ):
        assert required in unit
    # verify checks that ExecStart exists: point it at this machine's entry point.
    (tmp_path / "edgeguard.service").write_text(unit.replace("/opt/edgeguard/venv/bin/edgeguard", exe))
    p = subprocess.run(
        [tool, "verify", str(tmp_path / "edgeguard.service")], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "edgeguard.service" not in p.stderr, p.stderr  # no warnings about our unit


def test_example_hooks_are_executable_shell() -> None:
    hooks = sorted((ROOT / "firmware_hooks" / "hooks.d").iterdir())
    assert hooks
    for hook in hooks:
        assert hook.stat().st_mode & 0o111, hook
        assert hook.read_text().startswith("#!/bin/sh")
        sh = shutil.which("sh")
        if sh:
            subprocess.run([sh, "-n", str(hook)], check=True)
