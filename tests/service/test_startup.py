"""Starting the service: the worker's entry point, ``run --check`` (everything a start would load), and the
supervisor's crash-loop bookkeeping across separate runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from edgeguard.service._state import Failure, SupervisorState, read_state, write_state
from edgeguard.service.config import SupervisorSection
from tests.service._env import Device, tiny_bundle
from tests.service.test_supervisor import FAST, Harness
from tests.support.broker import MosquittoBroker


def test_worker_start_prints_no_runtime_warning(tmp_path: Path) -> None:
    # `python -m edgeguard.service.<worker module>` must not find that module already imported by the
    # package (runpy then runs a second copy and warns on every worker start).
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start()
        try:
            dev.wait_ready()
        finally:
            assert dev.stop() == 0
    log = (tmp_path / "service.log").read_text()
    assert "edgeguard[worker" in log  # the worker did start and log
    assert "RuntimeWarning" not in log, log


def test_supervisor_does_not_import_the_worker_stack() -> None:
    # The supervisor only spawns and watches: it must not load the worker's modules (and with them the
    # inference and network libraries) into the process that has to stay small and alive.
    code = (
        "import sys; import edgeguard.service._supervisor, edgeguard.service._run; "
        "print(sorted(m for m in sys.modules if m.startswith('edgeguard.service._w')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_failures_of_an_earlier_run_do_not_count_towards_a_crash_loop(tmp_path: Path) -> None:
    # An earlier, separate run crash-looped a moment ago (a bad config, since fixed) and left its failures
    # in the state file. A fresh start that fails once must restart and serve, not enter the safe state.
    now = time.time()
    earlier = SupervisorState(first_start=now - 30, starts=3, failures=2)
    earlier.history = [Failure(at=now - 5, reason="crash: x"), Failure(at=now - 2, reason="crash: y")]
    write_state(tmp_path / "state.json", earlier)
    settings = SupervisorSection(**FAST, crash_loop_restarts=3, crash_loop_window_s=600)
    h = Harness(tmp_path, "crash-on-start:1", settings, count=True)
    with h:
        assert h.wait(
            lambda: any(e["event"] == "start" and e["behaviour"] == "ok" for e in h.events())
        ), h.events()
        assert h.wait(lambda: h.sup.state.repaired >= 1)  # the replacement reported ready
        assert [e["mode"] for e in h.events() if e["event"] == "start"] == ["serve", "serve"]
        assert not h.sup.state.safe_state and h.sup.mode == "serve"
    st = read_state(tmp_path / "state.json")
    assert st.failures == 3 and len(st.history) == 3  # the record (MTBF) keeps every failure
    assert not st.safe_state
