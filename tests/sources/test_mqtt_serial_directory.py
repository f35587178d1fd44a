"""MQTT input parser, serial frames over a real pty pair, and the watched directory."""

from __future__ import annotations

import os
import struct
import threading
import time
import tty
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import InputRejected
from edgeguard.sources import (
    BodyLimits,
    DirectoryConfig,
    DirectorySource,
    InferenceRequest,
    MqttInputSource,
    SerialConfig,
    SerialSource,
    parse_sensor_frame,
)
from edgeguard.sources.framing import encode_frame
from tests.sources.conftest import SPECS, RecordingSink


def _wait(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if callable(cond) and cond():
            return True
        time.sleep(0.02)
    return False


# -- MQTT input ---------------------------------------------------------------------------------------------
def test_mqtt_input_good_and_bad(sink: RecordingSink) -> None:
    rejects: list[str] = []
    src = MqttInputSource(
        sink=sink,
        specs=lambda: SPECS,
        limits=BodyLimits(max_body_bytes=1024),
        on_reject=lambda source, reason: rejects.append(reason),
    )
    src.start()
    src.handle(b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}, "id": "m1"}')
    src.handle(b"\xff\xfe not json")
    src.handle(b'{"inputs": {"x": [[5, 5, 5, 5]]}}')
    src.handle(b"x" * 2000)
    src.handle(b'{"inputs": {"x": [[0, 0, 0, 0]]}, "id": "m2"}')
    src.stop()
    assert [r.correlation_id for r in sink.requests] == ["m1", "m2"]
    assert src.counts["ok"] == 2 and src.counts["rejected"] == 2 and src.counts["oversize"] == 1
    assert any("above 1.0" in r for r in rejects) and any("exceeds the limit" in r for r in rejects)


def test_mqtt_input_full_queue_drops_and_counts(sink: RecordingSink) -> None:
    src = MqttInputSource(sink=sink, specs=lambda: SPECS, limits=BodyLimits(), queue_size=2)
    for _ in range(5):  # not started: nothing drains the queue
        src.handle(b'{"inputs": {"x": [[0, 0, 0, 0]]}}')
    assert src.counts["dropped_full"] == 3
    src.start()
    src.stop()
    assert len(sink.requests) == 2


# -- serial
# ---------------------------------------------------------------------------------------------------
def _frame(seq: int, values: list[float]) -> bytes:
    return encode_frame(struct.pack(">I", seq) + np.asarray(values, "<f4").tobytes())


def test_parse_sensor_frame_exact_length() -> None:
    seq, req = parse_sensor_frame(struct.pack(">I", 9) + np.zeros(4, "<f4").tobytes(), SPECS[0])
    assert seq == 9 and req.tensors is not None and req.tensors["x"].shape == (1, 4)
    with pytest.raises(InputRejected, match="expected 20"):
        parse_sensor_frame(b"\0" * 10, SPECS[0])
    with pytest.raises(InputRejected, match="dynamic shape"):
        parse_sensor_frame(b"\0" * 20, TensorSpec(name="x", dtype="float32", shape=(None, 4)))


class Pty:
    """A pty pair behind a stable symlink, so the 'port' can vanish and come back like a USB adapter."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave = -1
        self.plug()

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.link.unlink(missing_ok=True)
        self.link.symlink_to(os.ttyname(self.slave))

    def unplug(self) -> None:
        self.link.unlink(missing_ok=True)
        os.close(self.master)
        os.close(self.slave)


def test_serial_frames_garbage_cut_and_reconnect(tmp_path: Path, sink: RecordingSink) -> None:
    pty = Pty(tmp_path / "ttyEG0")
    src = SerialSource(
        config=SerialConfig(port=str(pty.link), max_payload=64, reopen_min_s=0.05, reopen_max_s=0.2),
        sink=sink,
        specs=lambda: SPECS,
    )
    src.start()
    try:
        assert _wait(lambda: src.connected)
        cut = _frame(2, [0.2] * 4)[:-6]
        os.write(pty.master, b"\x55\xaa garbage" + _frame(1, [0.1] * 4) + cut + _frame(3, [0.3] * 4))
        os.write(pty.master, _frame(4, [0.4, 0.4, 0.4]))  # wrong length: rejected, not fatal
        os.write(pty.master, _frame(5, [9.0] * 4))  # out of range: the guard rejects it
        os.write(pty.master, _frame(6, [0.6] * 4))
        assert _wait(lambda: len(sink.requests) == 3)
        assert [r.correlation_id for r in sink.requests] == ["serial-1", "serial-3", "serial-6"]
        assert src.counts["rejected"] == 2
        # The port vanishes (adapter unplugged) and comes back under the same name.
        pty.unplug()
        assert _wait(lambda: not src.connected)
        time.sleep(0.3)
        pty.plug()
        assert _wait(lambda: src.connected and src.counts["opens"] == 2)
        os.write(pty.master, _frame(7, [0.7] * 4))
        assert _wait(lambda: len(sink.requests) == 4)
        assert src.counts["disconnects"] == 1
        assert src.snapshot()["bad_crc"] + src.snapshot()["bad_encoding"] >= 2
    finally:
        src.stop()
        pty.unplug()


# -- watched directory ------------------------------------------------------------------------------------
def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_directory_partial_done_failed(tmp_path: Path, sink: RecordingSink) -> None:
    watch = tmp_path / "incoming"
    t = [0.0]
    src = DirectorySource(
        config=DirectoryConfig(path=watch, settle_s=1.0, max_file_bytes=4096),
        sink=sink,
        specs=lambda: SPECS,
        clock=lambda: t[0],
    )
    src.prepare()  # no thread: polls are driven by hand with a controlled clock
    (watch / "a.npy").write_bytes(_npy_bytes(np.full((1, 4), 0.5, np.float32)))
    (watch / "b.json").write_text('{"inputs": {"x": [[9, 9, 9, 9]]}}')
    (watch / "c.npy.part").write_bytes(b"partial")
    (watch / ".hidden.npy").write_bytes(b"x")
    (watch / "d.txt").write_text("what")
    (watch / "e.npy").write_bytes(b"x" * 5000)
    (watch / "link.npy").symlink_to("/etc/passwd")
    growing = watch / "f.npy"
    growing.write_bytes(b"\x93NUMPY")
    assert src.poll_once() == 0  # first sight of every file: not settled yet
    t[0] = 0.5
    assert src.poll_once() == 0
    growing.write_bytes(_npy_bytes(np.zeros((1, 4), np.float32)))  # the camera is still writing
    t[0] = 1.2
    assert src.poll_once() == 4  # a, b, d, e settled; f changed; the symlink is refused
    assert (watch / "done" / "a.npy").exists() and (watch / "done" / "a.npy.result.json").exists()
    assert "above 1.0" in (watch / "failed" / "b.json.error.txt").read_text()
    assert "unsupported file type" in (watch / "failed" / "d.txt.error.txt").read_text()
    assert "exceeds the limit" in (watch / "failed" / "e.npy.error.txt").read_text()
    assert "symbolic links" in (watch / "failed" / "link.npy.error.txt").read_text()
    assert (watch / "c.npy.part").exists() and (watch / ".hidden.npy").exists() and growing.exists()
    t[0] = 2.5
    assert src.poll_once() == 1
    assert (watch / "done" / "f.npy").exists()
    assert [r.correlation_id for r in sink.requests] == ["a.npy", "f.npy"]


def test_directory_thread_processes_dropped_file(tmp_path: Path, sink: RecordingSink) -> None:
    watch = tmp_path / "in"
    src = DirectorySource(
        config=DirectoryConfig(path=watch, poll_s=0.05, settle_s=0.1), sink=sink, specs=lambda: SPECS
    )
    src.start()
    try:
        tmp = watch / "img.npy.part"
        tmp.write_bytes(_npy_bytes(np.zeros((1, 4), np.float32)))
        os.replace(tmp, watch / "img.npy")  # the well-behaved producer pattern
        assert _wait(lambda: (watch / "done" / "img.npy").exists())
    finally:
        src.stop()
    assert threading.active_count() >= 1


class _ExhaustedOnce(RecordingSink):
    """A sink whose first request runs out of memory (the engine, or a parser further down): the source must
    count it and go on, never let MemoryError end its thread."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = 0

    def __call__(self, request: InferenceRequest) -> dict[str, Any]:
        if not self.raised:
            self.raised += 1
            raise MemoryError
        return super().__call__(request)


def test_serial_memory_error_is_counted_and_the_reader_goes_on(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "ttyEG1")
    sink = _ExhaustedOnce()
    config = SerialConfig(port=str(pty.link), max_payload=64)
    src = SerialSource(config=config, sink=sink, specs=lambda: SPECS)
    src.start()
    try:
        assert _wait(lambda: src.connected)
        os.write(pty.master, _frame(1, [0.1] * 4) + _frame(2, [0.2] * 4))
        assert _wait(lambda: len(sink.requests) == 1)
        assert [r.correlation_id for r in sink.requests] == ["serial-2"]
        assert src.counts["failed"] == 1
    finally:
        src.stop()
        pty.unplug()


def test_mqtt_input_memory_error_is_counted_and_the_worker_goes_on() -> None:
    sink = _ExhaustedOnce()
    src = MqttInputSource(sink=sink, specs=lambda: SPECS, limits=BodyLimits(max_body_bytes=4096))
    src.start()
    try:
        src.handle(b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}')
        src.handle(b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}')
        assert _wait(lambda: len(sink.requests) == 1)
        assert src.counts["failed"] == 1 and src.counts["ok"] == 1
    finally:
        src.stop()


def test_mqtt_input_queue_is_bounded_in_bytes_not_only_in_count(sink: RecordingSink) -> None:
    """64 queued messages of max_body_bytes each could be 64 x 16 MiB: the queue also holds at most
    max_queued_bytes, dropping (and counting, and reporting) what does not fit."""
    rejects: list[str] = []
    body = b'{"inputs": {"x": [[0, 0, 0, 0]]}}'.ljust(400)
    src = MqttInputSource(sink=sink, specs=lambda: SPECS, limits=BodyLimits(max_body_bytes=512),
                          queue_size=64, max_queued_bytes=1000, on_reject=lambda _s, r: rejects.append(r))
    for _ in range(4):  # not started: nothing drains the queue
        src.handle(body)
    assert src.counts["dropped_full"] == 2 and src.snapshot()["queued_bytes"] == 800
    assert rejects == ["input queue full (800 bytes queued), message dropped"] * 2
    src.start()
    src.stop()
    assert len(sink.requests) == 2 and src.snapshot()["queued_bytes"] == 0
    src.handle(body)  # room again once processed
    assert src.snapshot()["queued_bytes"] == 400
    with pytest.raises(ValueError, match="max_queued_bytes"):
        MqttInputSource(sink=sink, specs=lambda: SPECS, limits=BodyLimits(max_body_bytes=512),
                        max_queued_bytes=500)
