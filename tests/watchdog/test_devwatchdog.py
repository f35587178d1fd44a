"""/dev/watchdog behaviour against stand-ins (the real device cannot be opened here)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edgeguard.errors import WatchdogError
from edgeguard.watchdog import DevWatchdog, SystemdNotifier, WatchdogChain


def test_keepalive_and_magic_close_on_file(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    wd = DevWatchdog(path=dev, timeout_s=10)
    wd.open()  # opening arms the device and kicks once
    assert wd.timeout_s == 10 and wd.kick_interval_s == pytest.approx(10 / 3)
    assert wd.kick() and wd.kick()
    wd.close(clean=True)
    assert dev.read_bytes() == b"\0\0\0V"
    assert not wd.kick()  # closed


def test_unclean_close_leaves_device_armed(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    wd = DevWatchdog(path=dev, timeout_s=5)
    wd.open()
    wd.close(clean=False)
    assert dev.read_bytes() == b"\0"  # no 'V': the board resets if nothing re-opens it


def test_nowayout_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    wd = DevWatchdog(path=dev, timeout_s=5, nowayout=True)
    wd.open()
    wd.close(clean=True)
    assert wd.nowayout
    assert "nowayout" in caplog.text


def test_fifo_reader_sees_kicks_through_chain(tmp_path: Path) -> None:
    fifo = tmp_path / "wd.fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def reader() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1):
                got.extend(chunk)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    t = [0.0]
    wd = DevWatchdog(path=fifo, timeout_s=3)
    chain = WatchdogChain(notifier=SystemdNotifier(environ={}), watchdogs=[wd], clock=lambda: t[0])
    chain.open()
    chain.tick(healthy=True)  # due immediately (first tick)
    t[0] = 0.5
    chain.tick(healthy=True)  # not due (interval 1 s)
    t[0] = 1.5
    chain.tick(healthy=False, reason="outbox not writable")  # withheld
    t[0] = 2.0
    chain.tick(healthy=True)
    chain.close(clean=True)
    th.join(5)
    assert bytes(got) == b"\0\0\0V"  # open-kick, first tick, the tick at 2.0, magic close


def test_missing_device_is_a_watchdog_error(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError, match="cannot open watchdog"):
        DevWatchdog(path=tmp_path / "nope", timeout_s=5).open()
