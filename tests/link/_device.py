"""A real EdgeGuard-like child process for the kill -9 test: outbox + MQTT link, producing results in a burst.

argv: db port count start. Prints "ready" once the link is started, then each result id once put() returned
(that is: acknowledged to the producer, so it must never be lost).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox


def main() -> None:
    db, port, count, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ob = Outbox(path=db, storage_key=bytes(32), device_id="dev")
    cfg = LinkConfig(
        port=port,
        username="dev",
        password="devpw",
        keepalive_s=5,
        heartbeat_s=1.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        startup_wait_s=2.0,
    )
    link = MqttLink(config=cfg, fleet="fleet", device_id="dev", outbox=ob)
    link.start()
    print("ready", flush=True)
    for i in range(start, start + count):
        rid = ob.put(json.dumps({"i": i}).encode())
        print(rid, flush=True)
        if i % 50 == 0:
            time.sleep(0.005)
    while ob.stats().depth:
        time.sleep(0.05)
    print("drained", flush=True)
    time.sleep(30)  # stay up until the test is done with us


if __name__ == "__main__":
    main()
