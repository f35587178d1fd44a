"""Benchmark: opening a sealed bundle of each cipher suite vs raw single-shot AES-256-GCM on the same 12 MB
real model (YOLOv8n), on this CPU as it is and with its AES and SHA instructions masked for OpenSSL.

    python tools/bench_bundle.py [--reps 15] [--model PATH] [--chunk-size BYTES] [--threads N] [--no-mask]

One bundle per suite (aes256gcm-sha256, chacha20poly1305-blake2b, aes256gcm-blake3) is packed once; each
CPU setting runs in a child process of its own, because OpenSSL reads ``OPENSSL_ia32cap`` once at start:

- ``native``: the CPU as it is;
- ``masked``: ``OPENSSL_ia32cap`` clears AES-NI and PCLMULQDQ (CPUID.1:ECX bits 25 and 1), SHA-NI
  (CPUID.7:EBX bit 29), VAES and VPCLMULQDQ (CPUID.7:ECX bits 9 and 10): the stand-in for a board without
  AES/SHA instructions (Raspberry Pi 4, Pi Zero 2 W). hashlib's SHA-256 is OpenSSL's, so it loses SHA-NI too;
  BLAKE2b (hashlib's own) and BLAKE3 use no such instructions anyway. The tool proves the masking took hold
  by timing raw AES-GCM and SHA-256 under both settings.

In each child: raw single-shot ``AESGCM.decrypt`` and ``ChaCha20Poly1305.decrypt`` of the model bytes, and
``open_bundle`` (verify + unwrap + digest check + decrypt, from a file and from bytes) of every suite,
interleaved repetitions, medians. Printed as throughput ratios vs raw AES-GCM under the same setting (1.0 =
as fast as raw), with the two goals: masked, the ChaCha/BLAKE2b suite opens >= 2x faster than the default;
native, the fastest suite opens at >= 0.6x raw AES-GCM. Memory: extra peak (tracemalloc, fresh child) of
opening the default suite from a file and from bytes, as a multiple of the model size.
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
from typing import Any

from edgeguard.bundle import DEFAULT_CHUNK_SIZE, SUITES, BundleLimits, TrustStore, open_bundle, pack_bundle
from edgeguard.keys import generate_keypair, load_device_key, load_publisher_key, load_recipient_key

# ~(AES-NI | PCLMULQDQ) in the CPUID.1 word, ~(SHA-NI | VAES | VPCLMULQDQ) in the CPUID.7 word (OpenSSL's
# OPENSSL_ia32cap syntax: "~" clears the given bits of what the CPU reports).
MASK = "~0x200000200000000:~0x60020000000"

_MEM_CHILD = """
import sys, tracemalloc
from pathlib import Path
from typing import Any
from edgeguard.bundle import BundleLimits, TrustStore, open_bundle
from edgeguard.keys import load_device_key, load_trusted_key
keys, bundle, mode, threads = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
trust = TrustStore([load_trusted_key(keys / "publisher.pub")])
device = load_device_key(keys / "device.key")
limits = BundleLimits(max_open_threads=threads)
source = bundle.read_bytes() if mode == "bytes" else bundle  # input bytes are not counted as extra
open_bundle(source, trust=trust, device_key=device, state_dir=None, limits=limits).wipe()  # warm caches
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
opened = open_bundle(source, trust=trust, device_key=device, state_dir=None, limits=limits)
peak = tracemalloc.get_traced_memory()[1] - base
print(peak, len(opened.model))
"""


def _interleaved(
    cases: dict[str, Callable[[], object]], reps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall milliseconds per case and median CPU/wall (all threads of this process: above 1 means
    threads really ran at once); cases alternate within each repetition so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            times[name].append(wall)
            cpu[name].append((time.process_time() - c0) / wall)
    return (
        {name: statistics.median(t) * 1000 for name, t in times.items()},
        {name: statistics.median(c) for name, c in cpu.items()},
    )


def _child(work: Path, model_path: Path, reps: int, threads: int | None) -> None:
    """One CPU setting (the parent chose ``OPENSSL_ia32cap``): times every case, prints JSON."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    model = model_path.read_bytes()
    limits = BundleLimits() if threads is None else BundleLimits(max_open_threads=threads)
    trust = TrustStore.from_files([work / "publisher.pub"])
    device = load_device_key(work / "device.key")
    key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    aes, chacha = AESGCM(key), ChaCha20Poly1305(key)
    aes_ct, chacha_ct = aes.encrypt(nonce, model, None), chacha.encrypt(nonce, model, None)

    def opener(source: Path | bytes) -> Callable[[], object]:
        return lambda: open_bundle(source, trust=trust, device_key=device, state_dir=None, limits=limits)

    cases: dict[str, Callable[[], object]] = {
        "raw AES-256-GCM": lambda: aes.decrypt(nonce, aes_ct, None),
        "raw ChaCha20-Poly1305": lambda: chacha.decrypt(nonce, chacha_ct, None),
        "SHA-256 pass": lambda: hashlib.sha256(model).digest(),
    }
    for suite in SUITES:
        path = work / f"{suite}.egm"
        cases[f"open {suite} (path)"] = opener(path)
        cases[f"open {suite} (bytes)"] = opener(path.read_bytes())
    times, cpu = _interleaved(cases, reps)
    json.dump({"times": times, "cpu": cpu, "threads": limits.open_threads()}, sys.stdout)


def _run_child(work: Path, args: argparse.Namespace, mask: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if mask is not None:
        env["OPENSSL_ia32cap"] = mask
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(work),
        "--model",
        str(args.model),
        "--reps",
        str(args.reps),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return dict(json.loads(out))


def _memory(keys: Path, bundle: Path, mode: str, threads: int) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _MEM_CHILD, str(keys), str(bundle), mode, str(threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--model", type=Path, help="model file (default: YOLOv8n from the nudenet wheel)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bundle chunk size")
    parser.add_argument("--threads", type=int, help="BundleLimits.max_open_threads (default: its default)")
    parser.add_argument("--no-mask", action="store_true", help="skip the masked (no AES/SHA) setting")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from edgeguard import zoo

        args.model = zoo.fetch("yolov8n")
    if args.child is not None:
        _child(args.child, args.model, args.reps, args.threads)
        return 0
    model = args.model.read_bytes()
    settings = {"native": None} if args.no_mask else {"native": None, "masked": MASK}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_keypair("publisher", work)
        generate_keypair("device", work)
        for suite in SUITES:
            data = pack_bundle(
                model,
                name="bench",
                version=1,
                sign_key=load_publisher_key(work / "publisher.key"),
                recipients=[load_recipient_key(work / "device.pub")],
                chunk_size=args.chunk_size,
                suite=suite,
            )
            (work / f"{suite}.egm").write_bytes(data)
        runs = {name: _run_child(work, args, mask) for name, mask in settings.items()}
        threads = int(runs["native"]["threads"])
        mem = {m: _memory(work, work / "aes256gcm-sha256.egm", m, threads) for m in ("path", "bytes")}

    size_mb = len(model) / 1e6
    print(
        f"model {args.model.name}: {size_mb:.1f} MB, chunk {args.chunk_size} B, {threads} open thread(s) "
        f"(cpus available: {BundleLimits(max_open_threads=64).open_threads()}), {args.reps} interleaved "
        "reps, medians; ratio = throughput vs raw single-shot AES-256-GCM under the same setting; load "
        f"average at the end {os.getloadavg()[0]:.1f}"
    )
    result: dict[str, object] = {"model_bytes": len(model), "threads": threads, "chunk_size": args.chunk_size}
    for name, run in runs.items():
        times, cpu = run["times"], run["cpu"]
        raw = times["raw AES-256-GCM"]
        label = (
            "CPU as it is" if name == "native" else f"OPENSSL_ia32cap={MASK} (no AES-NI/VAES/PCLMUL/SHA-NI)"
        )
        print(f"\n[{name}] {label}")
        for case, ms in times.items():
            # CPU ms (all threads): the work itself. On a machine shared with other jobs, cpu/wall well
            # below 1 (one thread) or 2 (two threads) means the case waited for a CPU, not for its work.
            print(
                f"  {case:<42} {ms:8.2f} ms  {size_mb / ms:6.2f} GB/s  {raw / ms:6.3f}x raw"
                f"  cpu/wall {cpu[case]:.2f}  cpu {ms * cpu[case]:7.2f} ms"
            )
            result[f"{name}: {case} vs raw"] = round(raw / ms, 3)
            result[f"{name}: {case} ms"] = round(ms, 2)
            result[f"{name}: {case} cpu ms"] = round(ms * cpu[case], 2)
    native = runs["native"]["times"]
    best = max(SUITES, key=lambda s: native["raw AES-256-GCM"] / native[f"open {s} (path)"])
    print("\ngoals:")
    for mode in ("path", "bytes"):
        ratio = native["raw AES-256-GCM"] / native[f"open {best} ({mode})"]
        print(
            f"  native, fastest suite {best}, open({mode}): {ratio:.3f}x raw AES-GCM (goal >= 0.6) "
            f"{'✓' if ratio >= 0.6 else '✗'}"
        )
    if "masked" in runs:
        masked = runs["masked"]["times"]
        for probe in ("raw AES-256-GCM", "SHA-256 pass"):
            slower = masked[probe] / native[probe]
            result[f"masking: {probe} slower by"] = round(slower, 1)
            print(f"  masking took hold: {probe} {slower:.1f}x slower masked than native")
        for mode in ("path", "bytes"):
            speedup = (
                masked[f"open aes256gcm-sha256 ({mode})"] / masked[f"open chacha20poly1305-blake2b ({mode})"]
            )
            result[f"masked: chacha20poly1305-blake2b vs aes256gcm-sha256 speedup ({mode})"] = round(
                speedup, 2
            )
            print(
                f"  masked, open({mode}): chacha20poly1305-blake2b {speedup:.2f}x faster than "
                f"aes256gcm-sha256 (goal >= 2) {'✓' if speedup >= 2 else '✗'}"
            )
    for mode, (peak, n) in mem.items():
        result[f"extra peak open({mode}) / model size"] = round(peak / n, 3)
        print(
            f"  extra peak memory, open aes256gcm-sha256 from {mode}: {peak / 1e6:.2f} MB = {peak / n:.3f}x "
            "model size (target <= 1.1)"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
