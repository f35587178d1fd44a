"""Benchmark: opening a sealed bundle vs raw AES-256-GCM on the same 12 MB real model (YOLOv8n).

    python tools/bench_bundle.py [--reps 21] [--model PATH]

Throughput: ``open_bundle`` (verify + unwrap + decrypt + digest, from memory and from a file) against one
single-shot ``AESGCM.decrypt`` of the same model bytes, interleaved repetitions, medians, reported as a ratio
of throughputs (1.0 = as fast as raw). For context it also times the two SHA-256 passes the format requires
(signed body digest before decryption, model digest after it), because on CPUs with VAES the hash, not the
cipher, bounds what is reachable. Memory: extra peak (tracemalloc, in a fresh child process) of opening
from a file and from bytes, as a multiple of the model size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeguard.bundle import TrustStore, open_bundle, pack_bundle
from edgeguard.keys import generate_keypair, load_device_key, load_publisher_key, load_recipient_key

_MEM_CHILD = """
import sys, tracemalloc
from pathlib import Path
from edgeguard.bundle import TrustStore, open_bundle
from edgeguard.keys import load_device_key, load_trusted_key
keys, bundle, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
trust = TrustStore([load_trusted_key(keys / "publisher.pub")])
device = load_device_key(keys / "device.key")
source = bundle.read_bytes() if mode == "bytes" else bundle  # input bytes are not counted as extra
open_bundle(source, trust=trust, device_key=device, state_dir=None).wipe()  # warm imports and caches
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
opened = open_bundle(source, trust=trust, device_key=device, state_dir=None)
peak = tracemalloc.get_traced_memory()[1] - base
print(peak, len(opened.model))
"""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _interleaved(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: _median_ms(t) for name, t in times.items()}


def _memory(keys: Path, bundle: Path, mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _MEM_CHILD, str(keys), str(bundle), mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--model", type=Path, help="model file (default: YOLOv8n from the nudenet wheel)")
    args = parser.parse_args()
    if args.model is None:
        from edgeguard import zoo

        args.model = zoo.fetch("yolov8n")
    model = args.model.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        generate_keypair("publisher", keys)
        generate_keypair("device", keys)
        device = load_device_key(keys / "device.key")
        trust = TrustStore.from_files([keys / "publisher.pub"])
        bundle = pack_bundle(
            model,
            name="bench",
            version=1,
            sign_key=load_publisher_key(keys / "publisher.key"),
            recipients=[load_recipient_key(keys / "device.pub")],
        )
        bundle_path = keys / "bench.egm"
        bundle_path.write_bytes(bundle)
        raw_key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
        raw_ct = AESGCM(raw_key).encrypt(nonce, model, None)
        raw = AESGCM(raw_key)

        times = _interleaved(
            {
                "raw AES-256-GCM decrypt": lambda: raw.decrypt(nonce, raw_ct, None),
                "open_bundle(bytes)": lambda: open_bundle(
                    bundle, trust=trust, device_key=device, state_dir=None
                ),
                "open_bundle(path)": lambda: open_bundle(
                    bundle_path, trust=trust, device_key=device, state_dir=None
                ),
                "one SHA-256 pass": lambda: hashlib.sha256(model).digest(),
            },
            args.reps,
        )
        mem = {mode: _memory(keys, bundle_path, mode) for mode in ("path", "bytes")}

    size_mb = len(model) / 1e6
    raw_ms = times["raw AES-256-GCM decrypt"]
    floor_ms = raw_ms + 2 * times["one SHA-256 pass"]
    print(f"model {args.model.name}: {size_mb:.1f} MB, {args.reps} interleaved reps, medians")
    for name, ms in times.items():
        print(f"  {name:<26} {ms:8.2f} ms  {size_mb / ms:6.2f} GB/s")
    result: dict[str, float] = {"model_bytes": len(model)}
    for name in ("open_bundle(bytes)", "open_bundle(path)"):
        ratio = raw_ms / times[name]
        result[f"{name} throughput vs raw"] = round(ratio, 3)
        result[f"{name} vs raw GCM + 2 SHA-256 passes"] = round(floor_ms / times[name], 3)
        print(
            f"  {name}: {ratio:.3f}x raw GCM throughput (target >= 0.6); "
            f"{floor_ms / times[name]:.2f}x of (raw GCM + the 2 SHA-256 passes the format requires)"
        )
    for mode, (peak, n) in mem.items():
        result[f"extra peak open({mode}) / model size"] = round(peak / n, 3)
        print(
            f"  extra peak memory, open from {mode}: {peak / 1e6:.2f} MB = {peak / n:.3f}x model size "
            "(target <= 1.1)"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
