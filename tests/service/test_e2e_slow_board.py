"""A slow board: one inference outlasts the liveness timeout (a Pi Zero 2 running YOLO takes seconds per run).

Liveness must never wait for an inference; a stuck inference is judged by its own bound, STALL_FACTOR x the
run time the self-test measured on this device (never less than hang_timeout_s). The real service, a real
mosquitto, the fault injector's slowed sessions (the delay sits inside the engine's run, like a slow CPU's).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from edgeguard.service._worker import STALL_FACTOR
from tests.service._env import ADMIN, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
RUN_S = 1.0  # every session run, the self-test's included: bound = max(2.0, 5 x 1.0) = 5.0 s
HANG_TIMEOUT_S = 2.0  # tests/service/_env.py's service.hang_timeout_s


def _supervisor(dev: Device) -> dict:
    return json.loads((dev.root / "state/supervisor.json").read_text())


def test_inference_longer_than_liveness_timeout_is_no_hang_but_a_stuck_one_is(tmp_path: Path) -> None:
    bound = max(HANG_TIMEOUT_S, STALL_FACTOR * RUN_S)
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start(env={"EDGEGUARD_FAULT": f"slow-run:{RUN_S}"})
        try:
            dev.wait_ready()
            health = dev.request("GET", "/v1/health", token=STATUS)[1]
            assert health["selftest_run_ms"] >= RUN_S * 1000  # the self-test measured this board's run time
            pid = dev.worker_pid()
            # One inference of ~3 s: longer than hang_timeout_s (2 s), within its own bound (5 s).
            extra = 2.0
            slow = json.dumps({"kind": "slow", "seconds": extra}).encode()
            assert dev.request("POST", "/v1/admin/fault", slow, token=ADMIN)[0] == 200
            t0 = time.monotonic()
            code, doc = dev.request("POST", "/v1/infer", GOOD, timeout=30)
            took = time.monotonic() - t0
            assert code == 200, doc
            assert HANG_TIMEOUT_S < took < bound, took
            # Liveness kept flowing during it: no restart, no failure recorded.
            assert dev.worker_pid() == pid
            state = _supervisor(dev)
            assert state["starts"] == 1 and state["failures"] == 0, state

            # A stuck inference (never returns) is restarted once it passes its own bound, not before.
            assert dev.request("POST", "/v1/admin/fault", b'{"kind": "stall"}', token=ADMIN)[0] == 200
            threading.Thread(target=lambda: _quiet_request(dev), daemon=True).start()
            t0 = time.monotonic()
            dev.wait(lambda: _supervisor(dev)["failures"] == 1, 60, "restart after a stuck inference")
            detected = time.monotonic() - t0
            assert detected >= bound - 0.5, f"restarted after {detected:.1f} s, before the bound {bound} s"
            reason = _supervisor(dev)["history"][-1]["reason"]
            assert reason.startswith("hang: inference stalled for"), reason
            assert f"(bound {bound:.1f} s)" in reason, reason
            dev.wait(lambda: dev.restarted(pid), 60, "serving again")
        finally:
            assert dev.stop() == 0


def _quiet_request(dev: Device) -> None:
    # The worker holding this request is killed on purpose.
    with contextlib.suppress(OSError):
        dev.request("POST", "/v1/infer", GOOD, timeout=60)
