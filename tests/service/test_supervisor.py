"""The supervisor with real child processes (a scripted stand-in worker): crash, hang, stall, crash loop."""

from __future__ import annotations

import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeguard.service._hooks import HookRunner
from edgeguard.service._state import read_state
from edgeguard.service._supervisor import Supervisor, WorkerMode
from edgeguard.service.config import SupervisorSection
from edgeguard.watchdog import SystemdNotifier, WatchdogChain
from tests.service._env import HOOK_DELAY_S, hook_events
from tests.support.slowdown import scaled

FAKE = Path(__file__).with_name("fake_worker.py")


class Harness:
    def __init__(
        self,
        tmp: Path,
        behaviour: str,
        settings: SupervisorSection,
        *,
        count: bool = False,
        grace: float = 30.0,
    ) -> None:
        self.tmp = tmp
        self.log = tmp / "worker.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.notify.setblocking(False)
        notifier = SystemdNotifier(
            environ={"NOTIFY_SOCKET": str(tmp / "notify.sock"), "WATCHDOG_USEC": "400000"}
        )
        hooks_dir = tmp / "hooks"
        hooks_dir.mkdir()
        hook = hooks_dir / "10-record"
        # Late on purpose (tests/service/_env.py says why): a test must wait for a hook's line.
        hook.write_text(f"#!/bin/sh\nsleep {HOOK_DELAY_S}\n(cat; echo) >> {tmp / 'hook.log'}\n")
        hook.chmod(0o755)
        count_file = str(tmp / "count") if count else ""

        def argv(cfg: Path, mode: WorkerMode, fd: int) -> list[str]:
            return [
                sys.executable,
                str(FAKE),
                "--liveness-fd",
                str(fd),
                "--mode",
                mode,
                "--behaviour",
                behaviour if mode == "serve" else "ok",
                "--log",
                str(self.log),
                "--count-file",
                count_file,
            ]

        self.sup = Supervisor(
            config_path=tmp / "cfg.toml",
            settings=settings,
            state_path=tmp / "state.json",
            chain=WatchdogChain(notifier=notifier),
            hooks=HookRunner(directory=hooks_dir, timeout_s=5, device_id="dev-1"),
            recovery_grace_s=grace,
            worker_argv=argv,
            handle_signals=False,
        )
        self.thread = threading.Thread(target=self.sup.run, daemon=True)
        self.messages: list[str] = []

    def __enter__(self) -> Harness:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sup.request_stop()
        self.thread.join(15)
        self.notifications()
        self.notify.close()

    def notifications(self) -> list[str]:
        while self.notify.fileno() >= 0:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                break
        return self.messages

    def events(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines()]

    def wait(self, cond: Any, timeout: float = 15.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.05)
        return False


FAST = dict(liveness_s=0.1, hang_timeout_s=1.0, backoff_initial_s=0.1, backoff_max_s=0.4, stop_timeout_s=3.0)


def test_ready_kicks_and_graceful_stop(tmp_path: Path) -> None:
    h = Harness(tmp_path, "ok", SupervisorSection(**FAST))
    with h:
        assert h.wait(lambda: any("READY=1" in m for m in h.notifications()))
        time.sleep(0.6)
        msgs = h.notifications()
        assert sum(m == "WATCHDOG=1" for m in msgs) >= 2
        assert any("STATUS=fake serve" in m for m in msgs)
    assert any(e["event"] == "graceful-stop" for e in h.events())  # SIGTERM reached the worker
    assert any(m.startswith("STOPPING=1") for m in h.notifications())
    assert read_state(tmp_path / "state.json").failures == 0


def test_crash_is_restarted_and_recorded(tmp_path: Path) -> None:
    h = Harness(tmp_path, "crash-after-ready", SupervisorSection(**FAST, crash_loop_restarts=50))
    with h:
        assert h.wait(lambda: h.sup.state.repaired >= 2)
    st = read_state(tmp_path / "state.json")
    assert st.failures >= 2 and st.history[0].reason == "crash: exit code 3"
    assert st.mttr_s is not None and st.mtbf_s is not None
    # The replacement worker was told why it was started (it publishes this as an event).
    controls = [e["msg"] for e in h.events() if e["event"] == "control"]
    assert any(c["kind"] == "restart" and c["data"]["reason"] == "crash: exit code 3" for c in controls)
    assert h.wait(lambda: "restart" in hook_events(tmp_path / "hook.log"))


def test_hang_is_detected_within_timeout_plus_margin(tmp_path: Path) -> None:
    h = Harness(tmp_path, "hang-after-ready", SupervisorSection(**FAST, crash_loop_restarts=50))
    with h:
        assert h.wait(lambda: any(e["event"] == "hanging" for e in h.events()))
        hung_at = time.monotonic()
        assert h.wait(lambda: sum(e["event"] == "start" for e in h.events()) >= 2, timeout=1.0 + scaled(4.0))
        restarted = time.monotonic() - hung_at
        assert h.wait(lambda: h.sup.state.repaired >= 1)
    st = read_state(tmp_path / "state.json")
    assert st.history[0].reason.startswith("hang: no liveness")
    # hang_timeout (a clock) + 2 s of restart work (+1 s for this busy test machine), scaled on slow machines
    assert restarted <= 1.0 + scaled(2.0 + 1.0)
    assert st.history[0].mttr_s is not None and st.history[0].mttr_s <= 1.0 + scaled(2.0 + 1.0)


def test_stalled_inference_counts_as_hang(tmp_path: Path) -> None:
    h = Harness(tmp_path, "stall", SupervisorSection(**FAST, crash_loop_restarts=50))
    with h:
        assert h.wait(lambda: h.sup.state.failures >= 1)
    assert read_state(tmp_path / "state.json").history[0].reason.startswith("hang:")


def test_unhealthy_worker_withholds_watchdog(tmp_path: Path) -> None:
    h = Harness(tmp_path, "unhealthy", SupervisorSection(**FAST))
    with h:
        assert h.wait(lambda: any("READY=1" in m for m in h.notifications()))
        seen = len(h.notifications())
        time.sleep(0.8)
        msgs = h.notifications()[seen:]
        assert "WATCHDOG=1" not in msgs
        assert any(m.startswith("STATUS=UNHEALTHY: outbox not writable") for m in h.notifications())
        assert h.sup.chain.withheld > 0


def test_crash_loop_enters_safe_state_with_backoff(tmp_path: Path) -> None:
    h = Harness(
        tmp_path, "crash-on-start", SupervisorSection(**FAST, crash_loop_restarts=3, crash_loop_window_s=60)
    )
    with h:
        assert h.wait(lambda: any(e["mode"] == "safe" and e["event"] == "start" for e in h.events()))
        assert h.wait(lambda: any("SAFE STATE" in m for m in h.notifications()))
        starts = [e for e in h.events() if e["event"] == "start"]
        assert [e["mode"] for e in starts[:4]] == ["serve", "serve", "serve", "safe"]
        assert h.wait(
            lambda: any(e["event"] == "control" and e["msg"]["kind"] == "crash-loop" for e in h.events())
        )
        assert h.sup.state.safe_state
        time.sleep(0.5)
        assert sum(e["event"] == "start" for e in h.events()) == 4  # no thrashing in the safe state
    st = read_state(tmp_path / "state.json")
    assert st.failures == 3 and "3 failures within 60 s" in (st.safe_reason or "")
    assert h.wait(lambda: "crash-loop" in hook_events(tmp_path / "hook.log"))


def test_backoff_grows_exponentially(tmp_path: Path) -> None:
    settings = SupervisorSection(
        **{**FAST, "backoff_initial_s": 0.2, "backoff_max_s": 2.0}, crash_loop_restarts=50
    )
    h = Harness(tmp_path, "crash-on-start", settings)
    with h:
        assert h.wait(lambda: h.sup.state.failures >= 4)
    log = (tmp_path / "worker.log").read_text().splitlines()
    assert len(log) >= 4
    # Gaps between starts: ~0.2, 0.4, 0.8 s (+ process start time); each at least the backoff.
    st = read_state(tmp_path / "state.json")
    times = [f.at for f in st.history[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8


def test_sighup_leaves_safe_state(tmp_path: Path) -> None:
    h = Harness(tmp_path, "crash-on-start:2", SupervisorSection(**FAST, crash_loop_restarts=2), count=True)
    with h:
        assert h.wait(lambda: h.sup.mode == "safe" and h.sup.state.repaired >= 1)
        h.sup.request_reload()
        assert h.wait(lambda: h.sup.mode == "serve" and not h.sup.state.safe_state)
        assert h.wait(
            lambda: (
                sum(
                    e["event"] == "start" and e["mode"] == "serve" and e["behaviour"] == "ok"
                    for e in h.events()
                )
                == 1
            )
        )


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    yield


def test_first_failure_of_a_serving_worker_restarts_at_once_then_backs_off(tmp_path: Path) -> None:
    """A worker that was serving and fails is replaced at once (recovery must not wait out a backoff); only a
    failure that follows another one without a stable period in between waits (crash-loop protection)."""
    settings = SupervisorSection(
        **{**FAST, "backoff_initial_s": 1.0, "backoff_max_s": 4.0}, crash_loop_restarts=50
    )
    h = Harness(tmp_path, "crash-after-ready", settings)
    with h:
        assert h.wait(lambda: h.sup.state.repaired >= 2, timeout=20)
    first, second = read_state(tmp_path / "state.json").history[:2]
    assert first.mttr_s is not None and first.mttr_s < 1.0, first
    assert second.mttr_s is not None and second.mttr_s >= 1.0, second
