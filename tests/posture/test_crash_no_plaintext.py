"""Plaintext never in a core dump or another process: the real service on a real YOLOv8n, a real mosquitto,
the kernel's own core dumps (docs/security.md, "Core dumps and ptrace")."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import pytest

from tests.posture._coredump import plaintext_windows
from tests.service._env import Device, yolo_bundle
from tests.support.broker import MosquittoBroker


def _core_pattern() -> str:
    try:
        return Path("/proc/sys/kernel/core_pattern").read_text().strip()
    except OSError:
        return ""


def _allow_core_dumps() -> None:
    # Only for the service child (and the workers it starts): the test never changes system-wide settings.
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _soft_core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4]
    raise AssertionError("no core limit line")


@pytest.mark.skipif(
    _core_pattern().startswith(("|", "/")),
    reason="core_pattern sends cores to a handler or an absolute path this test cannot read",
)
def test_worker_killed_by_sigsegv_and_sigabrt_leaves_no_core_with_plaintext(
    tmp_path: Path, yolov8n_path: Path
) -> None:
    model = yolov8n_path.read_bytes()
    try:
        _crash_the_worker_twice(tmp_path, yolov8n_path)
        cores = sorted(p for p in tmp_path.rglob("core*") if p.is_file())
        leaks = {p.name: (p.stat().st_size, plaintext_windows(p.read_bytes(), model)) for p in cores}
        assert not cores, f"core files (bytes, runs of >= 64 plaintext bytes): {leaks}"
    finally:  # whatever happened, no core file outlives the test
        for p in tmp_path.rglob("core*"):
            if p.is_file():
                p.unlink()


def _crash_the_worker_twice(tmp_path: Path, yolov8n_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(yolo_bundle(tmp_path, yolov8n_path))
        # The kernel writes a core into the crashing process's working directory (core_pattern "core").
        dev.start(cwd=tmp_path, preexec_fn=_allow_core_dumps)
        try:
            dev.wait_ready()
            assert dev.proc is not None
            # The premise: the service was started allowed to dump core, so only the worker can prevent it.
            assert _soft_core_limit(dev.proc.pid) == "unlimited"
            for sig in (signal.SIGSEGV, signal.SIGABRT):
                pid = dev.worker_pid()
                assert pid is not None
                assert _soft_core_limit(pid) == "0"  # the worker lowered what it inherited
                os.kill(pid, sig)
                dev.wait(lambda old=pid: dev.restarted(old), 120, f"a new worker after {sig.name}")
            dev.wait_ready()
        finally:
            dev.stop()
