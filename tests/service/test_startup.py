"""Starting the service: the worker's entry point, ``run --check`` (everything a start would load), and the
supervisor's crash-loop bookkeeping across separate runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service._env import Device, tiny_bundle
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
