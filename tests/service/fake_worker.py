"""A stand-in worker speaking the supervisor's liveness protocol, with scripted faults (for supervisor tests).

Usage: fake_worker.py --liveness-fd N --mode serve|safe --behaviour B --log FILE
Behaviours: ok, crash-on-start, hang-after-ready (event loop stops writing liveness), crash-after-ready,
stall (reports stalled inference), unhealthy (reports a failing health check).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--liveness-fd", type=int, required=True)
    ap.add_argument("--mode", default="serve")
    ap.add_argument("--behaviour", default="ok")
    ap.add_argument("--log", required=True)
    ap.add_argument("--count-file", default="")
    a = ap.parse_args()
    behaviour = a.behaviour
    if a.count_file:  # behaviour per start: "crash-on-start" for the first N starts, then ok
        n = int(Path(a.count_file).read_text()) if os.path.exists(a.count_file) else 0
        with open(a.count_file, "w") as f:
            f.write(str(n + 1))
        first, _, rest = behaviour.partition(":")
        behaviour = first if n < int(rest or 0) else "ok"

    def log(event: str, **kw: object) -> None:
        with open(a.log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "mode": a.mode, "event": event, **kw}) + "\n")

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: log("sighup"))

    def control() -> None:
        for line in sys.stdin:
            log("control", msg=json.loads(line))

    threading.Thread(target=control, daemon=True).start()
    log("start", behaviour=behaviour)
    if behaviour == "crash-on-start":
        time.sleep(0.05)
        return 70
    w = a.liveness_fd

    def send(msg: dict[str, object]) -> None:
        os.write(w, json.dumps(msg).encode() + b"\n")

    time.sleep(0.1)  # "loading the model"
    send({"t": "ready", "status": f"fake {a.mode}"})
    n = 0
    while not stopping.is_set():
        n += 1
        if behaviour == "hang-after-ready" and n > 3:
            log("hanging")
            time.sleep(3600)
        if behaviour == "crash-after-ready" and n > 3:
            os._exit(3)
        healthy = behaviour != "unhealthy"
        send(
            {
                "t": "alive",
                "healthy": healthy,
                "reason": "" if healthy else "outbox not writable",
                "stalled": behaviour == "stall" and n > 3,
                "status": f"fake {a.mode} {n}",
            }
        )
        time.sleep(0.1)
    log("graceful-stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
