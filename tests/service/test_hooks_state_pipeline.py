"""Event hooks (real executables), the supervisor's state file, and the pipeline's engine swap."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgeguard.errors import InputRejected, ServiceUnavailable
from edgeguard.service import HookRunner, Pipeline, SupervisorState, read_state, write_state
from edgeguard.sources import InferenceRequest


def _hook(d: Path, name: str, body: str) -> Path:
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


def test_hooks_run_in_order_with_event_on_stdin(tmp_path: Path) -> None:
    d = tmp_path / "hooks"
    d.mkdir()
    out = tmp_path / "out"
    _hook(d, "20-second", f'echo "second $1 $EDGEGUARD_EVENT" >> {out}')
    _hook(d, "10-first", f"cat >> {out}; echo >> {out}")
    _hook(d, "15-fails", "echo broken >&2; exit 3")
    _hook(d, "17-slow", "sleep 5")
    (d / "30-not-executable").write_text("#!/bin/sh\necho no >> x\n")
    _hook(d, ".hidden", f"echo hidden >> {out}")
    runner = HookRunner(directory=d, timeout_s=0.5, device_id="dev-1")
    t0 = time.monotonic()
    runner.fire("crash-loop", {"reason": "3 failures"}, wait=True)
    assert time.monotonic() - t0 < 4  # the slow hook was killed at its timeout
    lines = out.read_text().splitlines()
    event = json.loads(lines[0])
    assert event["event"] == "crash-loop" and event["device"] == "dev-1" and event["reason"] == "3 failures"
    assert lines[1] == "second crash-loop crash-loop"
    assert runner.runs == 4 and runner.failures == 2  # 15-fails and 17-slow


def test_unknown_event_kind_is_a_bug() -> None:
    with pytest.raises(ValueError):
        HookRunner(directory=None, timeout_s=1, device_id="d").fire("party")


def test_state_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "supervisor.json"
    st = SupervisorState(first_start=1.0, starts=3, up_s=100.0)
    f = st.record_failure(at=2.0, reason="crash: signal 9")
    f.mttr_s = 1.5
    st.repair_s, st.repaired = 1.5, 1
    write_state(p, st)
    back = read_state(p)
    assert back.failures == 1 and back.mtbf_s == 100.0 and back.mttr_s == 1.5
    assert (
        back.heartbeat_view()["last_reason"] == "crash: signal 9" and back.heartbeat_view()["restarts"] == 2
    )
    assert not list(tmp_path.glob(".supervisor.*"))  # no temp files left behind
    p.write_text("{not json")
    assert read_state(p).failures == 0  # unreadable: start afresh, never fatal


def _manifest(version: int) -> Any:
    # The pipeline reads only the name and version: a stand-in keeps this test off Manifest's fields.
    return SimpleNamespace(name="m", version=version, inputs=())


class FakeResult:
    def __init__(self, v: float) -> None:
        self.v = v

    def to_json(self) -> dict[str, Any]:
        return {"y": self.v}


class FakeEngine:
    def __init__(self, version: int, gate: threading.Event | None = None) -> None:
        self.manifest = _manifest(version)
        self.gate = gate
        self.closed = False

    def infer(self, inputs: Any) -> FakeResult:
        if self.gate is not None:
            self.gate.wait(5)
        if float(inputs["x"][0]) < 0:
            raise InputRejected("input 'x': negative")
        return FakeResult(float(inputs["x"][0]) * 2)

    def infer_image(self, image: Any) -> FakeResult:
        raise InputRejected("no images")

    def health(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.closed = True


class Store:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def put(self, payload: bytes, *, priority: bool = False, kind: str = "result") -> str:
        self.items.append(payload)
        return f"dev:{len(self.items) - 1}"


def _req(v: float) -> InferenceRequest:
    return InferenceRequest(source="api", tensors={"x": np.array([v], np.float32)}, correlation_id="c")


def test_pipeline_stores_before_answering_and_swaps_without_dropping() -> None:
    store = Store()
    gate = threading.Event()
    old = FakeEngine(1, gate)
    p = Pipeline(engine=old, store=store)
    results: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: results.append(p(_req(1.0))))
    t.start()
    time.sleep(0.1)
    assert p.in_flight() == 1 and p.oldest_in_flight_s() > 0
    new = FakeEngine(2)
    p.swap(new)  # reload while a request runs on the old engine
    assert not old.closed
    assert p(_req(2.0))["model"]["version"] == 2
    gate.set()
    t.join(5)
    assert results[0]["model"]["version"] == 1 and results[0]["id"] == "dev:1"
    assert old.closed and not new.closed  # closed after its last request
    assert json.loads(store.items[0])["y"] == 4.0
    with pytest.raises(InputRejected):
        p(_req(-1.0))
    assert len(store.items) == 2 and p.failed == 1  # nothing stored for a rejected input
    p.stop_accepting("stopping")
    with pytest.raises(ServiceUnavailable, match="stopping"):
        p(_req(1.0))
    assert Pipeline(engine=None, store=store).accepting is False


def test_service_session_helper(tmp_path: Path) -> None:
    """ServiceSession (for the demo and tools): READY, a request through the API, STATUS, a clean stop."""
    from edgeguard.service import ServiceSession
    from tests.service._env import INFER, Device, tiny_bundle
    from tests.support.broker import MosquittoBroker

    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        with ServiceSession(dev.config, api_port=dev.port, token=INFER) as s:
            code, doc = s.request("POST", "/v1/infer", b'{"inputs": {"x": [[0, 0.5, 1, 0.25]]}}')
            assert code == 200 and doc["outputs"]["y"]["data"] == [[0.0, 1.0, 2.0, 0.5]]
            assert s.status.startswith("serving sensor v1")
        assert any(n.startswith("STOPPING=1") for n in s.notifications)
