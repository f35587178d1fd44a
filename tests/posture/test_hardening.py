"""The hardening module on the real kernel: dumpable flag, core limit, DONTDUMP and mlock on buffers, and
what a process of the same (non-root) user can read of another's memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgeguard._hardening as hardening

_MODULE = Path(hardening.__file__)
# A process of another user cannot run the venv's interpreter where it lives under a private home: the
# module needs only the standard library, so any Python 3 that user can run will do.
_AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

_TARGET = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("h", sys.argv[1]); h = importlib.util.module_from_spec(spec)
sys.modules["h"] = h  # dataclasses look their module up there
spec.loader.exec_module(h)
secret = bytearray(os.urandom(4096))
import ctypes
address = ctypes.addressof((ctypes.c_char * len(secret)).from_buffer(secret))
state = h.harden_process().to_json() if sys.argv[2] == "harden" else None
print(address, secret.hex(), state is not None and state["dumpable"], flush=True)
sys.stdin.readline()
"""

_READER = """
import os, sys
pid, address, n = (int(a) for a in sys.argv[1:4])
try:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    print(os.pread(fd, n, address).hex())
except OSError as exc:
    print(type(exc).__name__)
"""


def _python_for_nobody() -> str | None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*_AS_NOBODY, candidate, "-c", "pass"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def nobody_python() -> str:
    python = _python_for_nobody()
    if python is None:
        pytest.skip("needs root, setpriv and a Python the user nobody can run")
    return python


@pytest.mark.parametrize("harden", [False, True])
def test_same_user_process_cannot_read_a_hardened_process_memory(nobody_python: str, harden: bool) -> None:
    target = subprocess.Popen(
        [*_AS_NOBODY, nobody_python, "-c", _TARGET, str(_MODULE), "harden" if harden else "plain"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert target.stdout is not None and target.stdin is not None
        address, secret, dumpable = target.stdout.readline().split()
        mem = Path(f"/proc/{target.pid}/mem")
        # Both run as nobody, with no capabilities (setpriv leaves none when it drops root).
        read = subprocess.run(
            [*_AS_NOBODY, nobody_python, "-c", _READER, str(target.pid), address, "4096"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if harden:
            assert dumpable == "False"
            assert read == "PermissionError"
            assert mem.stat().st_uid == 0  # the kernel hands /proc/<pid> of a non-dumpable process to root
        else:  # the control: without hardening the same user reads the secret verbatim
            assert read == secret
            assert mem.stat().st_uid == 65534
        target.stdin.write("\n")
        target.stdin.flush()
    finally:
        target.kill()
        target.wait()


def _vm_flags(address: int) -> set[str]:
    """VmFlags of the mapping holding ``address`` in this process (proc(5), /proc/pid/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _address(buf: bytearray) -> int:
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


_PROTECT = """
import ctypes, importlib.util, json, sys
sys.path.insert(0, sys.argv[2])
from tests.posture.test_hardening import _vm_flags
spec = importlib.util.spec_from_file_location("h", sys.argv[1]); h = importlib.util.module_from_spec(spec)
sys.modules["h"] = h
spec.loader.exec_module(h)
# Above glibc's largest mmap threshold (32 MiB): a mapping of its own.
buf = bytearray(40 * 1024 * 1024)
address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
before = sorted(_vm_flags(address))
locked = h.protect(buf)
during = sorted(_vm_flags(address))
locked_bytes = h.memory_protection()["locked_bytes"]
h.release(buf)
after = sorted(_vm_flags(address))
h.release(buf)  # twice is harmless
print(json.dumps({"before": before, "locked": locked, "during": during, "locked_bytes": locked_bytes,
                  "after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux kernel interfaces")
def test_protect_excludes_a_buffer_from_core_dumps_and_locks_it_until_released() -> None:
    # In a fresh process: in the test process a mapping may already carry the flags this test looks for (the
    # kernel reuses address ranges that other tests' protected buffers held), which failed it once by chance.
    out = subprocess.run([sys.executable, "-c", _PROTECT, str(_MODULE), str(Path(__file__).parents[2])],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert "dd" not in doc["before"]
    assert "dd" in doc["during"]  # MADV_DONTDUMP
    assert doc["locked"] == ("lo" in doc["during"])
    if doc["locked"]:
        assert doc["locked_bytes"] >= 40 * 1024 * 1024
    assert "lo" not in doc["after"]


_MLOCK_REFUSED = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("h", sys.argv[1]); h = importlib.util.module_from_spec(spec)
sys.modules["h"] = h  # dataclasses look their module up there
spec.loader.exec_module(h)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
print(json.dumps({"locked": h.protect(bytearray(4 * 1024 * 1024)), **h.memory_protection()}))
"""


def test_a_buffer_over_the_memlock_limit_is_reported_not_locked(nobody_python: str) -> None:
    out = subprocess.run(
        [*_AS_NOBODY, nobody_python, "-c", _MLOCK_REFUSED, str(_MODULE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    doc = json.loads(out)
    assert doc["locked"] is False and doc["locked_bytes"] == 0 and doc["unlocked_bytes"] >= 4 * 1024 * 1024
    assert doc["memlock_limit"] == 64 * 1024
    assert "not locked in RAM" in doc["mlock"] and "RLIMIT_MEMLOCK is 0.1 MiB" in doc["mlock"]


_HARDEN = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
import edgeguard._hardening as h
before = h.process_hardening().to_json()
after = h.harden_process().to_json()
again = h.harden_process().to_json()
print(json.dumps([before, after, again]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux kernel interfaces")
def test_harden_process_sets_core_limit_zero_and_clears_dumpable() -> None:
    out = subprocess.run([sys.executable, "-c", _HARDEN], capture_output=True, text=True, check=True).stdout
    before, after, again = json.loads(out)
    assert before["dumpable"] is True and before["core_limit"] == -1
    assert after == again == {"supported": True, "dumpable": False, "core_limit": 0, "errors": []}


def test_off_linux_everything_is_a_reported_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening, "_LIBC", None)
    buf = bytearray(b"x" * 8192)
    assert hardening.protect(buf) is False
    hardening.release(buf)
    state = hardening.process_hardening()
    assert state.supported is False and state.dumpable is None and not state.ok
    assert state.core_limit == (
        -1 if resource.getrlimit(resource.RLIMIT_CORE)[0] < 0 else resource.getrlimit(resource.RLIMIT_CORE)[0]
    )


_CLI_HARDEN = """
import json, resource
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
import edgeguard._hardening as h
state = h.harden_process(lock_core_limit=False).to_json()
print(json.dumps([state, resource.getrlimit(resource.RLIMIT_CORE)[1] == resource.RLIM_INFINITY]))
"""


def test_cli_hardening_leaves_the_hard_limit_for_later_children() -> None:
    out = subprocess.run([sys.executable, "-c", _CLI_HARDEN], capture_output=True, text=True, check=True)
    state, hard_kept = json.loads(out.stdout)
    assert state["dumpable"] is False and state["core_limit"] == 0 and hard_kept
