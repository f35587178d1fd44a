"""``edgeguard scan`` (the device's security posture) and ``edgeguard advisories sign`` (publisher side)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError
from edgeguard.keys import load_publisher_key
from edgeguard.posture import ADVISORY_FILE, AdvisoryError, run_scan, sign_advisories
from edgeguard.service.config import load_config

_RAW = argparse.RawDescriptionHelpFormatter
DEFAULT_CONFIG = Path("/etc/edgeguard/edgeguard.toml")

_SCAN_HELP = f"""\
Check this device's security posture: the broker connection (TLS, anonymous access), the local API (bind
address, weak, shared or old tokens), owners and modes of keys, tokens, config, hooks and state, core dumps
and ptrace, swap, the clock, the watchdog, the systemd unit's sandboxing, and the installed versions of
EdgeGuard's dependencies against the publisher's signed {ADVISORY_FILE} beside the bundle. No network.

Each finding has a severity (info, low, medium, high, critical), the evidence and the fix.
Exit status: 0 when nothing is above "low", 1 otherwise, 2 on a config error.

example:
  edgeguard scan -c /etc/edgeguard/edgeguard.toml --json"""

_SIGN_HELP = f"""\
Sign an advisory payload (JSON: {{"created": ..., "advisories": [...]}}, see docs/security.md) with the
publisher key; ship the output as {ADVISORY_FILE} beside the bundle."""

_COLOURS = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``scan`` and ``advisories sign``."""
    p = sub.add_parser("scan", help="the device's security posture: findings, evidence, fixes",
                       description=_SCAN_HELP, formatter_class=_RAW)
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, metavar="CONFIG.toml",
                   help=f"service configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_scan)

    p = sub.add_parser("advisories", help="publisher side: sign the advisory file devices check against")
    asub = p.add_subparsers(dest="advisories_command", metavar="ACTION", required=True)
    s = asub.add_parser("sign", help="sign an advisory payload", description=_SIGN_HELP, formatter_class=_RAW)
    s.add_argument("payload", type=Path, metavar="PAYLOAD.json")
    s.add_argument("--sign-key", required=True, type=Path, metavar="KEY", help="publisher.key")
    s.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help=ADVISORY_FILE)
    s.set_defaults(handler=_sign)


def _scan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # ConfigError -> exit 2
    report = run_scan(cfg)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        console = Console()
        table = Table("severity", "check", "finding", "evidence", "fix",
                      title=f"EdgeGuard posture of {cfg.device.id}: worst {report.worst}")
        for f in report.findings:
            colour = _COLOURS[f.severity]
            table.add_row(f"[{colour}]{f.severity}[/]", f.check, f.title, f.evidence, f.fix)
        console.print(table)
        console.print("nothing above low" if report.ok else "[red]findings above low: exit 1[/]")
    return 0 if report.ok else 1


def _sign(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{args.payload}: {exc}") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{args.payload}: the payload must be a JSON object")
    try:
        data = sign_advisories(payload, load_publisher_key(args.sign_key))
    except AdvisoryError as exc:
        raise ConfigError(f"{args.payload}: {exc}") from None
    atomic_write(args.output, data, mode=0o644)
    print(f"signed {len(payload.get('advisories', []))} advisories -> {args.output}", file=sys.stderr)
    return 0
