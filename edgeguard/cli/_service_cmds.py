"""``edgeguard run -c CONFIG.toml``: the service (supervisor + worker; see docs/service.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "run",
        help="run the service (supervisor, worker, input sources, MQTT link, watchdogs)",
        description="Run EdgeGuard as a service. Under systemd use Type=notify "
        "(firmware_hooks/edgeguard.service). "
        "SIGTERM stops gracefully; SIGHUP reloads the config and the model bundle.",
        epilog="example:\n  edgeguard init mydevice && edgeguard run -c mydevice/edgeguard.toml\n"
        "  edgeguard run -c /etc/edgeguard/edgeguard.toml --check    # validate, then exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        required=True,
        metavar="CONFIG.toml",
        help="service configuration (see examples/edgeguard.toml)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check everything a start would load (files and modes, keys, tokens, the bundle verified and "
        "self-tested without raising the rollback floor, the broker's address) and exit: 0, or 2 with one "
        "line per problem naming its config key",
    )
    p.add_argument(
        "--no-supervisor",
        action="store_true",
        help="run the worker in the foreground without the supervisor (debugging)",
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so `edgeguard --help` and other commands do not load the service stack.
    from edgeguard.service import load_config, run_service  # noqa: PLC0415

    if args.check:
        from edgeguard.service._check import check_startup  # noqa: PLC0415

        cfg = load_config(args.config)
        problems, passed = check_startup(cfg)
        for problem in problems:  # every problem, one line each, naming the config key
            print(f"edgeguard: {cfg.path}: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(f"{cfg.path}: ok (device {cfg.device.id}, fleet {cfg.device.fleet}): {'; '.join(passed)}")
        return 0
    return run_service(args.config, supervise=not args.no_supervisor)
