"""Child process for the kill -9 test: put results as fast as possible, print each id once put() returned."""

from __future__ import annotations

import sys
from pathlib import Path

from edgeguard.outbox import Outbox, OutboxConfig


def main() -> None:
    path, count = Path(sys.argv[1]), int(sys.argv[2])
    ob = Outbox(
        path=path, storage_key=bytes(32), device_id="dev", config=OutboxConfig(commit_window_s=0.0005)
    )
    print("ready", flush=True)
    for i in range(count):
        rid = ob.put(b'{"i":%d}' % i)
        print(rid, flush=True)
    ob.close()


if __name__ == "__main__":
    main()
