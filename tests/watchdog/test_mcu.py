"""External MCU watchdog over a real pty pair, against the test-side firmware simulator."""

from __future__ import annotations

import contextlib
import os
import time
import tty
from collections.abc import Iterator

import pytest
import serial

from edgeguard.errors import WatchdogError
from edgeguard.watchdog import McuWatchdog, SystemdNotifier, WatchdogChain
from tests.watchdog.mcu_sim import McuSimulator

_SIMS: list[McuSimulator] = []


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(master)
    name = os.ttyname(slave)
    yield master, name
    # Join simulator threads before the fds close: a reused fd number must not be read by a stale thread.
    while _SIMS:
        _SIMS.pop().stop()
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


def _wait(cond: object, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if callable(cond) and cond():
            return True
        time.sleep(0.02)
    return False


def test_hello_kick_status_disarm(pty_pair: tuple[int, str]) -> None:
    master, name = pty_pair
    sim = McuSimulator(master, garbage_before_reply=b"\x13\x37")  # line noise before each reply
    _SIMS.append(sim)
    sim.start()
    wd = McuWatchdog(port=name, timeout_s=2.0)
    wd.open()
    assert sim.armed and sim.timeout_ms == 2000
    assert wd.boot_count == 7 and wd.last_reset_cause == 1
    for _ in range(3):
        assert wd.kick()
    assert sim.kicks == 3 and sim.last_seq == 3
    st = wd.status()
    assert st is not None and st.armed and st.last_seq == 3 and st.timeout_ms == 2000
    wd.close(clean=True)
    assert sim.disarmed and not sim.armed
    sim.stop()


def test_kicks_stop_when_unhealthy_and_mcu_resets_board(pty_pair: tuple[int, str]) -> None:
    master, name = pty_pair
    sim = McuSimulator(master)
    _SIMS.append(sim)
    sim.start()
    wd = McuWatchdog(port=name, timeout_s=1.0)
    chain = WatchdogChain(notifier=SystemdNotifier(environ={}), watchdogs=[wd])
    chain.open()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # healthy for longer than the timeout: no reset
        chain.tick(healthy=True)
        time.sleep(0.05)
    assert sim.board_resets == 0 and sim.kicks >= 3
    kicks = sim.kicks
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        chain.tick(healthy=False, reason="worker hung")
        time.sleep(0.05)
    assert sim.kicks == kicks
    assert _wait(lambda: sim.board_resets == 1), (sim.board_resets, sim.armed, sim.kicks)
    sim.stop()


def test_silent_mcu_is_a_clear_error(pty_pair: tuple[int, str]) -> None:
    master, name = pty_pair
    sim = McuSimulator(master)
    _SIMS.append(sim)
    sim.silent = True
    sim.start()
    with pytest.raises(WatchdogError, match="did not answer HELLO"):
        McuWatchdog(port=name, timeout_s=2.0, reply_timeout_s=0.2).open()
    sim.stop()


def test_missed_ack_is_counted(pty_pair: tuple[int, str]) -> None:
    master, name = pty_pair
    sim = McuSimulator(master)
    _SIMS.append(sim)
    sim.start()
    wd = McuWatchdog(port=name, timeout_s=2.0, reply_timeout_s=0.2)
    wd.open()
    sim.silent = True
    assert not wd.kick()
    assert wd.missed_acks == 1
    sim.silent = False
    assert wd.kick()  # the next sequence number is accepted
    wd.close()
    sim.stop()


def test_missing_port_is_a_watchdog_error() -> None:
    with pytest.raises(WatchdogError, match="cannot open MCU watchdog port"):
        McuWatchdog(port="/dev/does-not-exist-edgeguard", timeout_s=2.0).open()


def test_pyserial_port_available() -> None:
    assert serial.VERSION
