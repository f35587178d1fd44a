"""Primary/standby for a stream bound to one device, on real mosquitto and real device services.

The primary is frozen (SIGSTOP: its TCP connection stays open, as in a power cut or a cut cable, so only the
keepalive can tell) and then killed; the standby takes the stream over when the primary's LWT says offline,
and hands it back when the restarted primary is online again. From the results alone (device, fencing token,
time) no two devices ever served the stream at the same time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.sites._site import FLEET, GROUP, KEEPALIVE_S, kill9, make_device, site_toml, watching
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

STREAM = """
[[site.streams]]
name = "cam-1"
primary = "dev-a"
standby = ["dev-b"]
handback = true
"""
TOPIC = f"edgeguard/v1/{FLEET}/group/{GROUP}/stream/cam-1/input"


class Camera:
    """Publishes frames to the stream at a steady rate until stopped."""

    def __init__(self, port: int, rate: float = 20.0) -> None:
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        self._rate = rate
        self._stop = threading.Event()
        self.sent = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self._rate):
            self.sent += 1
            body = json.dumps({"inputs": {"x": [[0.5, 0.5, 0.5, 0.5]]}, "id": f"f-{self.sent}"}).encode()
            self._c.publish(TOPIC, body, qos=1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._c.disconnect()
        self._c.loop_stop()


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _stream_results(watch):  # type: ignore[no-untyped-def]
    with watch.lock:
        return [r for r in watch.results if r.get("stream") == "cam-1"]


def test_standby_takes_over_within_keepalive_and_never_serves_with_the_primary(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "broker") as broker, watching(broker) as watch:
        devs = {
            d: make_device(tmp_path / d, broker, d, site=site_toml(streams=STREAM))
            for d in ("dev-a", "dev-b")
        }
        for d in devs.values():
            d.start()
        camera = None
        try:
            for d in devs.values():
                d.wait_ready()
            _wait(lambda: watch.leases.get("cam-1", [{}])[-1].get("holder") == "dev-a", scaled(30), "lease a")
            camera = Camera(broker.port)
            _wait(
                lambda: any(r["served_by"] == "dev-a" for r in _stream_results(watch)), scaled(30), "a serves"
            )

            # Freeze the primary: the broker only learns it is gone from the missing keepalive (LWT).
            primary = devs["dev-a"]
            assert primary.proc is not None
            worker = primary.worker_pid()
            assert worker is not None
            os.kill(worker, signal.SIGSTOP)
            os.kill(primary.proc.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            _wait(
                lambda: any(r["served_by"] == "dev-b" for r in _stream_results(watch)), scaled(60), "b serves"
            )
            served_at = time.monotonic()
            with watch.lock:
                lwt = [
                    t
                    for t, topic, doc in watch.log
                    if t >= frozen_at and topic.endswith("/member/dev-a") and doc.get("state") == "offline"
                ]
            assert lwt, "the primary's LWT (member offline) was never seen"
            # The device's part: from the broker's LWT to the standby's first result, at most 1 s (scaled: it
            # is this machine's work). The LWT itself comes when mosquitto's keepalive check fires: nominally
            # keepalive x 1.5; measured here 2.7-3.2 s for an idle client and up to ~8 s for a busy member
            # (docs/sites.md, "Failover time"), so the whole takeover is reported, not bounded, here.
            assert served_at - lwt[0] <= scaled(1.0), (
                f"standby served {served_at - lwt[0]:.2f} s after the LWT"
            )
            print(
                f"\ntakeover: LWT after {lwt[0] - frozen_at:.2f} s, first standby result after "
                f"{served_at - frozen_at:.2f} s (keepalive {KEEPALIVE_S} s)"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
            kill9(primary)

            # The primary comes back; by policy (handback) the standby stops, then hands the lease back.
            primary.start()
            primary.wait_ready()
            n = len(_stream_results(watch))
            _wait(
                lambda: any(r["served_by"] == "dev-a" for r in _stream_results(watch)[n:]),
                scaled(60),
                "a serves again",
            )
            time.sleep(0.5)  # a few more frames after the hand-back (not a synchronisation)
        finally:
            if camera is not None:
                camera.stop()
            for d in devs.values():
                if d.proc is not None:
                    d.stop()
        results = _stream_results(watch)
        spans: dict[int, tuple[str, float, float]] = {}
        for r in results:
            tok, dev, t = r["fencing_token"], r["served_by"], r["time"]
            if tok in spans:
                holder, lo, hi = spans[tok]
                assert holder == dev, f"token {tok} served by {holder} and {dev}"
                spans[tok] = (holder, min(lo, t), max(hi, t))
            else:
                spans[tok] = (dev, t, t)
        order = sorted(spans)
        assert [spans[t][0] for t in order][:1] == ["dev-a"] and "dev-b" in [spans[t][0] for t in order]
        assert spans[order[-1]][0] == "dev-a", spans  # handed back
        for earlier, later in itertools.pairwise(order):
            assert spans[earlier][2] <= spans[later][1], f"tokens {earlier} and {later} overlap: {spans}"
        # The standby counted its takeover; the lease history is monotonic.
        tokens = [lease["token"] for lease in watch.leases["cam-1"]]
        assert tokens == sorted(tokens), tokens
