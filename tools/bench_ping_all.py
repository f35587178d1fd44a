#!/usr/bin/env python3
"""Benchmark: a signed `ping` to every device of a simulated fleet, until every answer is in and verified.

    python tools/bench_ping_all.py 200 1000 --rounds 3

For each fleet size N: a provisioned fleet directory (`fleet init` + `fleet add-device` of N devices: each
simulated device answers with its own key), a fresh mosquitto (max_connections -1) on a free local port,
tools/fleet_sim.py N on that directory (signed commands checked by each device's own gatekeeper, answers
signed), then --rounds times the operator's command as a person runs it:

    edgeguard fleet send ping --to all --sign-key KEY --device-keys DIR/devices --json --timeout 120

and per round: `wall` (the whole command: interpreter start, key and pinned-key loading, connecting, learning
the online devices from their retained statuses, signing, publishing, every answer verified, exit), `last`
(from the command's publish to the last verified answer, the command's own figure) and `p50` (median answer
latency). The same is done with `--to sim-0000` (one device) for comparison. A round counts only when every
online device answered ok with a signature verified against its pinned key. Prints one line per N and round
and a JSON summary. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _edgeguard(*args: str | Path, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeguard", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _ping(fleet_dir: Path, port: int, to: str, expect: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = _edgeguard("fleet", "send", "ping", "--to", to, "--sign-key", fleet_dir / "keys/operator.key",
                     "--fleet", "plant", "--broker", f"127.0.0.1:{port}",
                     "--device-keys", fleet_dir / "devices", "--timeout", "120", "--json")
    wall = time.perf_counter() - t0
    doc = json.loads(out.stdout)
    answers = doc["answers"]
    verified = [a for a in answers if a["verdict"] == "verified" and a["answer"] and a["answer"]["ok"]]
    if out.returncode != 0 or len(verified) != expect:
        raise SystemExit(f"bench_ping_all: {to}: {len(verified)}/{expect} verified answers (exit "
                         f"{out.returncode}): {out.stderr[-500:]}")
    lat = sorted(a["latency_ms"] for a in verified)
    return {"wall_s": round(wall, 3), "last_ms": lat[-1], "p50_ms": round(statistics.median(lat), 1),
            "answers": len(lat)}


def bench(n: int, rounds: int, work: Path) -> dict[str, Any]:
    from tests.support.broker import MosquittoBroker

    fleet_dir = work / str(n) / "plant"  # the fleet is named after its directory
    names = [f"sim-{i:04d}" for i in range(n)]
    steps: list[list[str | Path]] = [
        ["fleet", "init", fleet_dir, "--broker", "127.0.0.1:8883", "--group", "line-1"],
        ["fleet", "add-device", "-f", fleet_dir, *names, "--group", "line-1"],
    ]
    for argv in steps:
        res = _edgeguard(*argv)
        if res.returncode != 0:
            raise SystemExit(f"bench_ping_all: {' '.join(map(str, argv[:2]))}: {res.stderr}")
    with MosquittoBroker(work, extra_config="max_connections -1\n") as broker:
        sim = subprocess.Popen(
            [sys.executable, str(ROOT / "tools/fleet_sim.py"), str(n), "--fleet-dir", str(fleet_dir),
             "--broker", f"127.0.0.1:{broker.port}", "--heartbeat", "30", "--keepalive", "60",
             "--results-every", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            assert sim.stdout is not None
            for line in sim.stdout:
                if line.startswith(f"ready {n}"):
                    break
            else:
                raise SystemExit(f"bench_ping_all: the simulator exited before {n} devices were ready")
            one = [_ping(fleet_dir, broker.port, "sim-0000", 1) for _ in range(rounds)]
            every = []
            for r in range(rounds):
                every.append(_ping(fleet_dir, broker.port, "all", n))
                print(f"N={n} round {r + 1}: all {every[-1]}  one {one[r]}", flush=True)
        finally:
            sim.kill()
            sim.wait(timeout=30)
    return {"devices": n, "all": every, "one": one}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sizes", type=int, nargs="+", help="fleet sizes")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeguard-ping-all-"))
    try:
        results = [bench(n, args.rounds, work) for n in args.sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
