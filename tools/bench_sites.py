#!/usr/bin/env python3
"""Sites: failover time over repeated kills, throughput of 3 devices vs 1, duplicates per failover.

Real mosquitto, real device services (``edgeguard run``, the small sensor model of the service tests), one
process per device; inputs through :class:`edgeguard.sites.GroupClient` (correlation ids, retry on timeout or
on a member's LWT).

  python tools/bench_sites.py                  # 20 kills (kill -9), throughput 1 vs 3 devices
  python tools/bench_sites.py --kills 5 --freeze  # SIGSTOP instead: the broker learns it from the keepalive
  python tools/bench_sites.py --throughput-n 3000 --kills 0

Failover time of one kill: from the kill to the moment every input sent before it has a result (what the
dead device held comes back through the sender's retry). Duplicates per failover: results beyond the first
for one correlation id, counted by the sender (the devices mark them ``redelivered``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeguard.sites import GroupClient  # noqa: E402
from tests.service._env import Device  # noqa: E402
from tests.sites._site import FLEET, GROUP, KEEPALIVE_S, kill9, make_device, site_toml  # noqa: E402
from tests.support.broker import MosquittoBroker  # noqa: E402


def _body(i: int) -> bytes:
    v = (i % 100) / 100.0
    return json.dumps({"inputs": {"x": [[v, v, v, v]]}}).encode()


def _start(root: Path, broker: MosquittoBroker, ids: list[str]) -> dict[str, Device]:
    devs = {d: make_device(root / d, broker, d, site=site_toml(check_s=0.25)) for d in ids}
    for d in devs.values():
        d.start()
    for d in devs.values():
        d.wait_ready()
    return devs


def _stop(devs: dict[str, Device]) -> None:
    for d in devs.values():
        if d.proc is not None:
            d.stop()


def _wait_members(client: GroupClient, ids: list[str], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(client.members.get(d, {}).get("share") == "joined" for d in ids):
            return
        time.sleep(0.05)
    raise SystemExit(f"members not in the share: {client.members}")


def throughput(root: Path, n: int, count: int) -> float:
    """Inputs per second answered by ``count`` devices (sent as fast as the client can, window-limited)."""
    ids = [f"dev-{i}" for i in range(count)]
    with MosquittoBroker(root / "broker") as broker:
        devs = _start(root, broker, ids)
        try:
            with GroupClient(
                host="127.0.0.1", port=broker.port, fleet=FLEET, group=GROUP, retry_after_s=120.0
            ) as client:
                _wait_members(client, ids)
                t0 = time.monotonic()
                # Unanswered inputs at most: below leave_at per device, so no member leaves the share (with
                # every member out of it, mosquitto drops the input and only the retry brings it back).
                # The same window for 1 and 3 devices, so the ratio compares devices, not windows.
                window = 20
                for i in range(n):
                    while i - sum(1 for a in client.answers.values() if a.result is not None) >= window:
                        time.sleep(0.002)
                    client.send(f"t-{i}", _body(i))
                if not client.wait_all(300.0):
                    raise SystemExit(f"{len(client.unanswered())} inputs unanswered")
                return n / (time.monotonic() - t0)
        finally:
            _stop(devs)


def failovers(root: Path, kills: int, rate: float, freeze: bool) -> dict[str, Any]:
    ids = ["dev-a", "dev-b", "dev-c"]
    times: list[float] = []
    dups: list[int] = []
    with MosquittoBroker(root / "broker") as broker:
        devs = _start(root, broker, ids)
        try:
            with GroupClient(
                host="127.0.0.1",
                port=broker.port,
                fleet=FLEET,
                group=GROUP,
                retry_after_s=3 * KEEPALIVE_S + 5.0,
            ) as client:
                _wait_members(client, ids)
                stop = threading.Event()
                sent = [0]

                def feed() -> None:
                    t0 = time.monotonic()
                    while not stop.is_set():
                        client.send(f"f-{sent[0]}", _body(sent[0]))
                        sent[0] += 1
                        time.sleep(max(0.0, t0 + sent[0] / rate - time.monotonic()))

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                for k in range(kills):
                    victim = devs[ids[k % 3]]
                    time.sleep(1.0)  # steady traffic before the kill
                    before = {c for c in list(client.answers)}
                    dup0 = client.duplicates()
                    pid = victim.worker_pid() if freeze else None
                    t_kill = time.monotonic()
                    if freeze:
                        assert victim.proc is not None and pid is not None
                        os.kill(pid, signal.SIGSTOP)
                        os.kill(victim.proc.pid, signal.SIGSTOP)
                    else:
                        kill9(victim)
                    while True:  # every input sent before the kill answered
                        pending = [c for c in before if client.answers[c].result is None]
                        if not pending:
                            break
                        client.retry_due()
                        time.sleep(0.01)
                    times.append(time.monotonic() - t_kill)
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        kill9(victim)
                    victim.start()
                    victim.wait_ready()
                    _wait_members(client, ids)
                    dups.append(client.duplicates() - dup0)
                    print(
                        f"kill {k + 1}/{kills}: {ids[k % 3]} failover {times[-1]:.3f} s, "
                        f"duplicates {dups[-1]}",
                        file=sys.stderr,
                    )
                stop.set()
                feeder.join(5)
                ok = client.wait_all(120.0)
                return {
                    "times": times,
                    "dups": dups,
                    "sent": sent[0],
                    "all_answered": ok,
                    "duplicates": client.duplicates(),
                    "retries": client.retries,
                }
        finally:
            _stop(devs)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="devices killed one after another (default 20)")
    ap.add_argument("--rate", type=float, default=50.0, help="group inputs per second during the kills")
    ap.add_argument(
        "--freeze", action="store_true", help="SIGSTOP (power cut as the broker sees it), not kill -9"
    )
    ap.add_argument("--throughput-n", type=int, default=2000, help="inputs per throughput run (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="eg-bench-sites-") as tmp:
        root = Path(tmp)
        if args.throughput_n:
            one = throughput(root / "one", args.throughput_n, 1)
            three = throughput(root / "three", args.throughput_n, 3)
            print(
                f"throughput: 1 device {one:.0f}/s, 3 devices {three:.0f}/s, ratio {three / one:.2f}x "
                f"({os.cpu_count()} CPUs shared by broker, devices and sender)"
            )
        if args.kills:
            r = failovers(root / "kills", args.kills, args.rate, args.freeze)
            t = r["times"]
            how = "SIGSTOP" if args.freeze else "kill -9"
            print(
                f"failover ({how}, keepalive {KEEPALIVE_S} s, {len(t)} kills): "
                f"median {statistics.median(t):.3f} s, "
                f"p99 {_pct(t, 0.99):.3f} s, max {max(t):.3f} s"
            )
            print(
                f"duplicates per failover: mean {statistics.mean(r['dups']):.2f}, max {max(r['dups'])}; "
                f"inputs {r['sent']}, all answered: {r['all_answered']}, retries {r['retries']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
