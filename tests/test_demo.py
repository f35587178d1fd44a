"""`edgeguard demo`, the README's main job, on a real model and (for delivery) a real mosquitto."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from edgeguard.demo import run_demo
from tests.support.broker import MosquittoBroker, free_port


def test_demo_without_broker_buffers_every_result(tmp_path: Path) -> None:
    printed = io.StringIO()
    summary = run_demo(workdir=tmp_path / "w", broker=("127.0.0.1", free_port()),
                       console=Console(file=printed, width=160))
    assert summary["tampered"] == "integrity"
    assert summary["accelerator"] == "cpu"  # this machine has no accelerator: the CPU path was proven
    assert summary["detections"]["astronaut.png"] >= 1  # the face in the photo
    assert summary["buffered"] == 3  # all three results stayed in the outbox
    assert "delivered" not in summary
    # The short service session: real supervisor + worker, local API with token auth, graceful stop.
    assert summary["service_bad_input"] == 400
    assert summary["service_bad_token"] == 401
    assert summary["service_health"] == 200
    assert summary["service_exit"] == 0
    assert "heartbeats" not in summary  # no broker, so none could be seen
    text = printed.getvalue()
    assert "FACE_FEMALE" in text and "stay in the outbox" in text
    # The scratch directory holds the sealed bundle but never the plaintext model.
    model = (tmp_path / "w" / "demo-yolov8n-v1.egm").read_bytes()
    assert b"onnx" not in model[-4096:]


def test_demo_cli_delivers_to_a_broker(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edgeguard", "demo", "--broker", f"127.0.0.1:{broker.port}"],
            capture_output=True, text=True, timeout=240, check=False,
            env=dict(os.environ, COLUMNS="200"),
        )
    finally:
        broker.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"buffered": 3, "delivered": 3' in done.stdout, done.stdout[-3000:]
    assert '"service_exit": 0' in done.stdout and '"heartbeats": ' in done.stdout
    assert "outbox depth now 0" in done.stdout
    # Every figure the demo prints is a figure: a field read under the wrong name would print "None".
    heartbeat = next(ln for ln in done.stdout.splitlines() if "heartbeat on MQTT" in ln)
    assert re.search(r"inferences \d+,", heartbeat), heartbeat
    assert "None" not in done.stdout, [ln for ln in done.stdout.splitlines() if "None" in ln]


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "edgeguard", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "is not empty" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "x").read_text() == "keep me"
