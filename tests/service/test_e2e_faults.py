"""The service under faults, on a small sealed sensor model with a real mosquitto: hang, stalled inference,
crash loop -> safe state, serial frames over a pty, SIGHUP reload (good and tampered bundles), bad config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np

from edgeguard.sources.framing import encode_frame
from tests.service._env import ADMIN, STATUS, Device, hook_events, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder
from tests.support.slowdown import scaled
from tests.watchdog.mcu_sim import McuSimulator

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'


def _heartbeats(rec: Recorder) -> list[dict]:
    return [json.loads(p) for p in rec.on_topic("/heartbeat")]


def _events(rec: Recorder) -> list[dict]:
    return [json.loads(p) for p in rec.on_topic("/events")]


def test_hang_and_stall_are_restarted_within_timeout(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        wd = tmp_path / "watchdog"  # stand-in for /dev/watchdog (a regular file: no ioctls)
        wd.write_bytes(b"")
        dev.provision(tiny_bundle(tmp_path), extra=f'[watchdog]\ndevice = "{wd}"\ndevice_timeout_s = 3\n')
        dev.start()
        try:
            dev.wait_ready()
            assert dev.request("POST", "/v1/infer", GOOD)[0] == 200
            dev.wait(lambda: wd.stat().st_size >= 3, 10, "/dev/watchdog keepalives")
            # A hang of the worker's event loop: liveness stops; restart within hang_timeout (2 s) + 2 s.
            old = dev.worker_pid()
            assert dev.request("POST", "/v1/admin/fault", b'{"kind": "hang"}', token=ADMIN)[0] == 200
            t0 = time.monotonic()
            dev.wait(lambda: dev.restarted(old), 30, "restart after hang")
            mttr = time.monotonic() - t0
            # hang timeout (a clock) + the restart's work, which a slow machine honestly takes longer to do
            assert mttr <= 2.0 + scaled(2.0 + 1.5), f"hang recovery took {mttr:.1f} s"  # +1.5 s: busy CI
            assert rec.wait_for(
                lambda m: any(
                    h["supervisor"]["last_reason"].startswith("hang: no liveness")
                    for h in _heartbeats(rec)
                    if h["supervisor"]["last_reason"]
                ),
                10,
            )
            assert rec.wait_for(
                lambda m: any(h["supervisor"]["mttr_s"] is not None for h in _heartbeats(rec)), 10
            )
            hb = [h for h in _heartbeats(rec) if h["supervisor"]["mttr_s"] is not None][-1]
            assert hb["supervisor"]["restarts"] == 1 and hb["supervisor"]["mttr_s"] <= 2.0 + scaled(3.5)
            assert hb["supervisor"]["mtbf_s"] is not None
            # A stalled inference (wedged accelerator call): the worker reports it, the supervisor restarts
            # it.
            old = dev.worker_pid()
            assert dev.request("POST", "/v1/admin/fault", b'{"kind": "stall"}', token=ADMIN)[0] == 200
            threading.Thread(target=lambda: _quiet_request(dev), daemon=True).start()
            dev.wait(lambda: dev.restarted(old), 30, "restart after stall")
            assert rec.wait_for(
                lambda m: any(
                    "inference stalled" in str(h["supervisor"]["last_reason"]) for h in _heartbeats(rec)
                ),
                10,
            )
            assert dev.request("POST", "/v1/infer", GOOD)[0] == 200
            dev.wait(lambda: "restart" in hook_events(tmp_path / "hooks.log"), 10, "the restart hook")
        finally:
            assert dev.stop() == 0
        kicks = wd.read_bytes()
        assert kicks.endswith(b"V") and kicks.count(b"\0") >= 5  # keepalives, then the magic close


def _quiet_request(dev: Device) -> None:
    # The worker holding this request is killed on purpose.
    with contextlib.suppress(OSError):
        dev.request("POST", "/v1/infer", GOOD, timeout=20)


def test_crash_loop_enters_safe_state_and_keeps_reporting(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        master, slave = os.openpty()
        tty.setraw(master)
        mcu = McuSimulator(master)  # the external watchdog's firmware, on a pty
        mcu.start()
        dev.provision(
            tiny_bundle(tmp_path),
            extra=f'[watchdog]\nmcu_port = "{os.ttyname(slave)}"\nmcu_timeout_s = 5.0\n',
        )
        dev.start(env={"EDGEGUARD_FAULT": "crash-on-start"})
        try:
            # Three crashes with backoff 0.2, 0.4 s -> the safe state: a reporting-only worker is READY.
            dev.wait_ready(60)
            assert rec.wait_for(lambda m: any(h.get("state") == "safe" for h in _heartbeats(rec)), 20)
            hb = [h for h in _heartbeats(rec) if h.get("state") == "safe"][-1]
            assert hb["supervisor"]["safe_state"] and hb["supervisor"]["failures"] == 3
            assert "3 failures" in hb["supervisor"]["safe_reason"]
            assert rec.wait_for(lambda m: any(e["kind"] == "crash-loop" for e in _events(rec)), 10)
            assert any("SAFE STATE" in n for n in dev.notifications())
            assert not dev.api_up()  # not serving
            dev.wait(lambda: "crash-loop" in hook_events(tmp_path / "hooks.log"), 10, "the crash-loop hook")
            time.sleep(1.0)
            assert json.loads((tmp_path / "state/supervisor.json").read_text())["starts"] == 4  # no thrashing
            # The safe state keeps the board alive: the MCU keeps getting kicks and never resets it.
            assert mcu.timeout_ms == 5000 and mcu.kicks >= 2 and mcu.board_resets == 0
        finally:
            assert dev.stop() == 0
            mcu_disarmed = mcu.disarmed
            mcu.stop()
            os.close(master)
            os.close(slave)
        assert mcu_disarmed  # clean stop: DISARM


def test_serial_frames_reload_and_rejected_bundle(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    link = tmp_path / "ttySENSOR"
    link.symlink_to(os.ttyname(slave))
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), serial_port=str(link))
        dev.start()
        try:
            dev.wait_ready()
            dev.wait(
                lambda: any(h["sources"].get("serial", {}).get("connected") for h in _heartbeats(rec)),
                20,
                "serial connected",
            )
            frame = encode_frame(struct.pack(">I", 1) + np.array([0.5, 0.25, 0.0, 1.0], "<f4").tobytes())
            os.write(master, b"\x00\xffnoise" + frame + frame[:7] + encode_frame(b"short") + frame)
            results = lambda: [json.loads(p)["data"] for p in rec.on_topic("/results")]  # noqa: E731
            assert rec.wait_for(lambda m: sum(r["source"] == "serial" for r in results()) == 2, 20)
            out = next(r for r in results() if r["source"] == "serial")["outputs"]["y"]["data"]
            assert np.allclose(out, [[1.0, 0.5, 0.0, 2.0]])

            # SIGHUP reload to version 2 (y = 3x) while requests keep coming: none is dropped.
            (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=2, scale=3.0))
            codes: list[int] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    codes.append(dev.request("POST", "/v1/infer", GOOD)[0])

            t = threading.Thread(target=load)
            t.start()
            time.sleep(0.3)
            assert dev.proc is not None
            dev.proc.send_signal(signal.SIGHUP)
            assert rec.wait_for(lambda m: any(e["kind"] == "reloaded" for e in _events(rec)), 30)
            time.sleep(0.3)
            stop.set()
            t.join(10)
            assert codes and set(codes) == {200}
            code, res = dev.request("POST", "/v1/infer", GOOD)
            assert res["model"]["version"] == 2 and np.allclose(
                res["outputs"]["y"]["data"], [[0.3, 0.6, 0.9, 1.2]]
            )

            # A tampered bundle on reload is rejected; the running model keeps serving.
            bad = bytearray(tiny_bundle(tmp_path, version=3))
            bad[-10] ^= 0xFF
            (tmp_path / "model.egm").write_bytes(bytes(bad))
            assert dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)[0] == 200
            assert rec.wait_for(lambda m: any(e["kind"] == "bundle-rejected" for e in _events(rec)), 30)
            ev = [e for e in _events(rec) if e["kind"] == "bundle-rejected"][-1]
            assert ev["check"] in ("integrity", "signature")
            code, res = dev.request("POST", "/v1/infer", GOOD)
            assert code == 200 and res["model"]["version"] == 2
            dev.wait(lambda: "bundle-rejected" in hook_events(tmp_path / "hooks.log"), 10, "the hook")
            assert dev.request("GET", "/v1/health", token=STATUS)[1]["pipeline"]["reloads"] == 1
        finally:
            assert dev.stop() == 0
            os.close(master)
            os.close(slave)


def test_bad_config_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[device]\nid = "d"\n[model]\nbundle = "m.egm"\ntrust = ["p.pub"]\ndevice_key = "k"\n'
        '[sources.api]\ntokens_file = "t"\nport = "80"\n'
    )
    p = subprocess.run(
        [sys.executable, "-m", "edgeguard", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "edgeguard: sources.api.port: must be an integer, got '80'"
    cfg.write_text(
        '[device]\nid = "d"\ncolour = "red"\n[model]\nbundle = "m.egm"\ntrust = ["p.pub"]\ndevice_key = "k"\n'
    )
    p = subprocess.run(
        [sys.executable, "-m", "edgeguard", "run", "--check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "device.colour: unknown key" in p.stderr


def test_rejected_bundle_at_start_keeps_reporting_then_reload_serves(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        bad = bytearray(tiny_bundle(tmp_path))
        bad[-5] ^= 0x01  # one flipped bit in the payload
        dev.provision(bytes(bad), directory=True)
        dev.start()
        try:
            dev.wait_ready()  # ready to report, not to serve: no crash loop for a bad bundle
            assert rec.wait_for(lambda m: any(e["kind"] == "bundle-rejected" for e in _events(rec)), 20)
            code, err = dev.request("POST", "/v1/infer", GOOD)
            assert code == 503 and "bundle rejected" in err["error"]
            assert rec.wait_for(lambda m: any(h.get("state") == "no-model" for h in _heartbeats(rec)), 10)
            (tmp_path / "incoming" / "x.json").write_bytes(GOOD)
            time.sleep(1.0)
            assert (tmp_path / "incoming" / "x.json").exists()  # kept until a model can serve it
            dev.wait(lambda: "bundle-rejected" in hook_events(tmp_path / "hooks.log"), 10, "the hook")
            # A valid bundle and SIGHUP: serving, and the waiting file is processed.
            (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=1))
            assert dev.proc is not None
            dev.proc.send_signal(signal.SIGHUP)
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 200, 30, "serving after reload")
            dev.wait(lambda: (tmp_path / "incoming" / "done" / "x.json").exists(), 10, "deferred file done")
            assert json.loads((tmp_path / "state/supervisor.json").read_text())["failures"] == 0
        finally:
            assert dev.stop() == 0
