"""``edgeguard infer | doctor | bench``: run a sealed model, explain the fast path, measure the engine."""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeguard._hardening import harden_process, memory_protection
from edgeguard.bundle import open_bundle
from edgeguard.engine import Engine, profile_cache_dirs, unavailable_reason
from edgeguard.engine._bench import run_benchmarks
from edgeguard.engine._litert import DEFAULT_DELEGATE_LIBRARIES, litert_library
from edgeguard.engine._onnx import onnxruntime_library
from edgeguard.engine.harden import result_json
from edgeguard.errors import BackendError, ConfigError, InputRejected
from edgeguard.keys import load_device_key
from edgeguard.posture._host import read_swaps
from edgeguard.profiles import (
    Accelerator,
    Profile,
    get_profile,
    load_profiles,
    match_profile,
    read_board_facts,
)

from ._bundle_cmds import add_trust_args, trust_from_args

_RAW = argparse.RawDescriptionHelpFormatter
_MAX_INPUT_BYTES = 256 * 1024 * 1024
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_INFER_HELP = """\
Verify and decrypt a sealed bundle into memory, pick the fast path for this board (self-tested against the
bundle's golden vectors), and run one input through it. INPUT is a .npy (the model's only input), a .npz
(one array per input name) or an image file (when the manifest declares image preprocessing).
Bad input exits 2 with the reason; a rejected bundle exits 3.

example:
  edgeguard infer --bundle yolo-v3.egm --trust keys/publisher.pub --device-key /etc/edgeguard/device.key \\
      astronaut.png --json"""

_DOCTOR_HELP = """\
Show the detected board and profile, which accelerators this machine has, and (with --bundle) which one a
model would run on and why the others were skipped."""

_BENCH_HELP = """\
EdgeGuard's full path (guard + engine) against the raw library on the same work, interleaved, as ratios:
YOLOv8n and PP-OCR det on onnxruntime, BlazeFace on LiteRT, and cold start (verify + decrypt + session +
self-test) against creating a raw session from the plaintext file.
Models come from PyPI wheels (edgeguard.zoo). Each ratio is marked against its target (✓/✗).

example:
  edgeguard bench --quick --only yolov8n
  edgeguard bench --strict          # exit 1 when a ratio misses its target (for CI)"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``infer``, ``doctor`` and ``bench``."""
    p = sub.add_parser("infer", help="run one input through a sealed model", description=_INFER_HELP,
                       formatter_class=_RAW)
    p.add_argument("--bundle", required=True, type=Path, metavar="B", help="the sealed bundle (.egm)")
    add_trust_args(p)
    p.add_argument("--device-key", required=True, type=Path, metavar="KEY", help="device.key")
    _profile_arg(p)
    p.add_argument("--state", type=Path, metavar="DIR", help="state directory holding rollback floors")
    p.add_argument("input", type=Path, metavar="INPUT", help=".npy, .npz or an image file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_infer)

    p = sub.add_parser("doctor", help="board, accelerators, and which one a model would use",
                       description=_DOCTOR_HELP, formatter_class=_RAW)
    _profile_arg(p)
    p.add_argument("--bundle", type=Path, metavar="B", help="also load this bundle and show the choice")
    p.add_argument("--trust", action="append", type=Path, metavar="PUB", help="trusted publisher.pub")
    p.add_argument("--revoked", action="append", default=[], metavar="KEYID", help=argparse.SUPPRESS)
    p.add_argument("--revocation-list", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--device-key", type=Path, metavar="KEY", help="device.key (with --bundle)")
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # fake /proc tree in tests
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_doctor)

    p = sub.add_parser("bench", help="engine vs raw library throughput and cold start (ratios)",
                       description=_BENCH_HELP, formatter_class=_RAW)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisy figures)")
    p.add_argument("--only", action="append", choices=("yolov8n", "yolov8n-int8", "ppocr-det", "blazeface"),
                   help="run only these models (repeatable)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses its target")
    p.set_defaults(handler=_bench)


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="P", help="device profile name or .toml path (default: detected)")


def _profile(args: argparse.Namespace, root: Path = Path("/")) -> tuple[Profile, str]:
    if args.profile:
        return get_profile(args.profile), "chosen with --profile"
    prof = match_profile(load_profiles(), read_board_facts(root))
    return prof, "detected"


# --- infer --------------------------------------------------------------------------------------------------

def read_input(path: Path) -> dict[str, np.ndarray] | bytes:
    """The tensors in a .npy/.npz, or the bytes of an image file; ``InputRejected`` when unreadable."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputRejected(f"{path}: cannot read input: {exc.strerror or exc}") from None
    if size > _MAX_INPUT_BYTES:
        raise InputRejected(f"{path}: {size} bytes is over the input limit of {_MAX_INPUT_BYTES} bytes")
    data = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"": np.load(io.BytesIO(data), allow_pickle=False)}
        if suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputRejected(f"{path}: not a valid {suffix} file: {exc}") from None
    if suffix in _IMAGE_SUFFIXES:
        return data
    raise InputRejected(f"{path}: unknown input type {suffix or '(none)'}; give a .npy, .npz or image file")


def _infer(args: argparse.Namespace) -> int:

    payload = read_input(args.input)  # a bad input is refused before any key or bundle work
    harden_process(lock_core_limit=False)  # about to hold the device key and the plaintext
    profile, _ = _profile(args)
    device_key = load_device_key(args.device_key)
    opened = open_bundle(args.bundle, trust=trust_from_args(args), device_key=device_key,
                         state_dir=args.state, commit_floor=False)
    with Engine.load(opened, profile=profile) as engine:
        opened.commit_rollback_floor()  # only once the model has proven it runs here
        if isinstance(payload, bytes):
            result = engine.infer_image(payload)
        else:
            if "" in payload:  # a bare .npy: the model's only input
                names = [s.name for s in engine.manifest.inputs]
                if len(names) != 1:
                    raise InputRejected(f"{args.input}: a .npy feeds one input, the model has {len(names)} "
                                        f"({', '.join(names)}); use a .npz keyed by input name")
                payload = {names[0]: payload[""]}
            result = engine.infer(payload)
    policy = engine.manifest.output  # output hardening: what the bundle lets leave, here too
    if args.json:
        print(json.dumps(result_json(result, policy)))
        return 0
    console = Console()
    console.print(f"[bold]{engine.manifest.name}[/] v{engine.manifest.version} on {result.backend}/"
                  f"{result.accelerator} in {result.latency_ms:.1f} ms ({profile.name})")
    if result.ood:
        console.print(f"[yellow]out of distribution:[/] {result.ood}")
    shown = result_json(result, policy)
    if "post" in shown:
        console.print_json(json.dumps(shown["post"]))
    if "outputs" not in shown and policy is not None:
        console.print("raw outputs: not shown (the bundle declares output hardening)")
        return 0
    table = Table("output", "shape", "dtype", "min", "max", "mean")
    for name, value in result.outputs.items():
        v = np.asarray(value, dtype=np.float64)
        table.add_row(name, str(list(value.shape)), str(value.dtype), f"{v.min():.4g}", f"{v.max():.4g}",
                      f"{v.mean():.4g}")
    console.print(table)
    return 0


# --- doctor -------------------------------------------------------------------------------------------------

def _presence(fmt: str, acc: Accelerator) -> str | None:
    """Why an accelerator is missing here, or None when its provider/library is present."""
    reason = unavailable_reason(fmt, acc)
    if reason is None and fmt == "tflite" and acc.kind in ("edgetpu", "gpu", "external"):
        library = str(acc.options.get("library", DEFAULT_DELEGATE_LIBRARIES.get(acc.kind, "")))
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            reason = f"delegate library not loadable: {exc}"
    return reason


def _libraries() -> dict[str, dict[str, str | None]]:
    """The library each backend family would use, its version, and why another one is not used.

    Boards carry older wheels (tflite-runtime beside numpy 1.x, onnxruntime 1.23 on JetPack 6); a report
    that names them is the first thing to read when a model behaves differently on one board.
    """
    try:
        ort_version, ort_note = onnxruntime_library()
        onnx = {"library": "onnxruntime", "version": ort_version, "note": ort_note}
    except BackendError as exc:
        onnx = {"library": None, "version": None, "note": str(exc)}
    lite = litert_library()
    return {"onnx": onnx, "tflite": {"library": lite.module, "version": lite.version, "note": lite.note},
            "arrays": {"library": "numpy", "version": np.__version__, "note": None}}


def _doctor(args: argparse.Namespace) -> int:
    facts = read_board_facts(args.root)
    profile, how = _profile(args, args.root)
    report: dict[str, Any] = {"board": facts.to_json(), "profile": profile.name, "profile_source": how,
                              "profile_file": profile.source, "threads": profile.effective_threads,
                              "accelerators": {}}
    report["libraries"] = _libraries()
    for fmt in ("onnx", "tflite"):
        report["accelerators"][fmt] = [
            {"label": a.label, "kind": a.kind, "present": (r := _presence(fmt, a)) is None, "reason": r}
            for a in profile.candidates(fmt)
        ]
    # Where a cache that holds the model (TensorRT engines, OpenVINO blobs) would live: RAM only.
    report["model_caches"] = [c.to_json() for c in profile_cache_dirs(profile)]
    if args.bundle is not None:
        report["model"] = _doctor_bundle(args, profile)
    report["memory"] = _doctor_memory(args.root)  # after the bundle: its buffer's mlock verdict is in it
    if args.json:
        print(json.dumps(report))
        return 0
    console = Console()
    console.print(f"[bold]board[/]: {facts.device_tree_model or '(no device-tree model)'} · arch {facts.arch}"
                  + (f" · L4T {report['board']['nv_tegra_release']}" if facts.nv_tegra_release else ""))
    console.print(f"[bold]profile[/]: {profile.name} ({how}; {profile.source}), "
                  f"{profile.effective_threads} threads")
    libs = report["libraries"]
    console.print("[bold]libraries[/]: " + " · ".join(
        f"{lib['library'] or '(none)'} {lib['version'] or ''}".rstrip() for lib in libs.values()))
    for fmt, lib in libs.items():
        if lib["note"]:
            console.print(f"  {fmt}: {lib['note']}")
    for fmt in ("onnx", "tflite"):
        table = Table("#", "accelerator", "kind", "present", "why not", title=f"{fmt} candidates, in order")
        for i, row in enumerate(report["accelerators"][fmt]):
            table.add_row(str(i + 1), row["label"], row["kind"], "yes" if row["present"] else "no",
                          row["reason"] or "")
        console.print(table)
    caches = profile_cache_dirs(profile)
    if not caches:
        console.print("[bold]model caches[/]: none (no accelerator writes a serialized model anywhere)")
    for c in caches:
        verdict = "in RAM" if c.in_ram else "REFUSED: not a RAM filesystem, this accelerator will not be used"
        console.print(f"[bold]model cache[/]: {c.label} {c.option} = {c.path} ({c.filesystem}; {verdict})")
    console.print(f"[bold]memory[/]: {_memory_line(report['memory'])}")
    if "model" in report:
        m = report["model"]
        table = Table("accelerator", "status", "reason",
                      title=f"model {m['name']} v{m['version']} ({m['format']}): runs on {m['accelerator']}")
        for c in m["candidates"]:
            table.add_row(c["label"], c["status"], c["reason"] or "")
        console.print(table)
    return 0


def _doctor_memory(root: Path) -> dict[str, Any]:
    """Could plaintext reach a disk through swap, and can it be locked in RAM (docs/security.md)? The
    service runs under its own limits (the unit's LimitMEMLOCK=): its heartbeat says what it got."""
    swaps = read_swaps(root / "proc", root / "sys")
    mem = memory_protection()
    return {"swap": None if swaps is None else [{"device": s.device, "kind": s.kind} for s in swaps],
            "swap_unencrypted": any(s.kind == "plain" for s in swaps or ()),
            "memlock_limit": mem["memlock_limit"], "mlock": mem["mlock"]}


def _memory_line(mem: dict[str, Any]) -> str:
    swaps = mem["swap"]
    if swaps is None:
        swap = "swap unknown (no /proc/swaps)"
    elif not swaps:
        swap = "no swap"
    elif mem["swap_unencrypted"]:
        plain = ", ".join(s["device"] for s in swaps if s["kind"] == "plain")
        swap = f"[red]unencrypted swap[/] on {plain}: model pages could reach the disk (docs/security.md)"
    else:
        swap = "swap on " + ", ".join(f"{s['device']} ({s['kind']})" for s in swaps)
    limit = mem["memlock_limit"]
    if mem["mlock"] != "ok":
        return f"{swap}; [yellow]{mem['mlock']}[/]"
    return f"{swap}; mlock limit {'unlimited' if limit < 0 else f'{limit / 2**20:.1f} MiB'}"


def _doctor_bundle(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:

    if not args.trust or args.device_key is None:
        raise ConfigError("--bundle needs --trust PUB and --device-key KEY")
    harden_process(lock_core_limit=False)  # about to hold the device key and the plaintext
    device_key = load_device_key(args.device_key)
    opened = open_bundle(args.bundle, trust=trust_from_args(args), device_key=device_key, state_dir=None,
                         commit_floor=False)
    with Engine.load(opened, profile=profile) as engine:
        engine.wait_standby(timeout=120.0)
        h = engine.health()
        return {"name": engine.manifest.name, "version": engine.manifest.version,
                "format": engine.manifest.format, "accelerator": h["accelerator"],
                "candidates": h["candidates"],
                "load_ms": h["load_ms"], "selftest_ms": h["selftest_ms"]}


# --- bench --------------------------------------------------------------------------------------------------

def _bench(args: argparse.Namespace) -> int:
    return run_benchmarks(
        quick=args.quick, only=args.only, as_json=args.json, out=sys.stdout, strict=args.strict
    )
