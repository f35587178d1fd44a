"""``edgeguard audit verify | show``: check and read the device's audit log (docs/security.md, "Audit log").

``verify`` exits 0 when the chain and every signed checkpoint hold (a torn last record after a power cut is
reported, not a failure), 3 when the log was tampered with (the line names the first record that fails), 2 for
a usage problem (no log, no key).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeguard.audit import SIGNING_PUB_FILE, checkpoints_from_capture, log_files, parse_line, verify_log
from edgeguard.errors import ConfigError
from edgeguard.keys import load_trusted_key

__all__ = ["register"]

EXIT_TAMPERED = 3  # like a rejected bundle: the evidence failed verification

_HELP = """\
Check or read the device's tamper-evident audit log (<state>/audit/audit-*.log).

verify: every record is intact and chained to the one before it, the chain starts at the first record or at
a signed retention record, every checkpoint is signed by the device key (--pub), and the log reaches the
newest signed checkpoint known (in the log, in checkpoint.json, or captured from MQTT with
--from-mqtt-capture). Exit 0 intact, 3 tampered (the first failing record is named), 2 usage error.
Use the device-sign.pub you copied off the device at provisioning: the one next to the log proves nothing
to someone who could rewrite both.

example:
  edgeguard audit verify --state /var/lib/edgeguard --pub fleet/dev-1/device-sign.pub
  mosquitto_sub -t 'edgeguard/v1/+/dev-1/events' -v > events.txt   # keep the published checkpoints
  edgeguard audit verify --state /var/lib/edgeguard --pub dev-1.pub --from-mqtt-capture events.txt
  edgeguard audit show --state /var/lib/edgeguard --kind api-lockout --since 2026-01-01T00:00:00Z"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("audit", help="verify or read the tamper-evident audit log", description=_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    for name, handler, helptext in (("verify", _verify, "check the chain and the signed checkpoints"),
                                    ("show", _show, "print records (filtered)")):
        a = asub.add_parser(name, help=helptext, description=_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        a.add_argument("files", nargs="*", type=Path, metavar="FILE",
                       help="log files in chain order (default: every log file under --state)")
        a.add_argument("--state", type=Path, default=Path("/var/lib/edgeguard"), metavar="DIR",
                       help="the service's state directory (default: /var/lib/edgeguard)")
        a.add_argument("--json", action="store_true", help="JSON output (default: text)")
        if name == "verify":
            a.add_argument("--pub", type=Path, metavar="device-sign.pub",
                           help="the device's signing public key (default: <state>/device-sign.pub)")
            a.add_argument("--from-mqtt-capture", type=Path, metavar="FILE",
                           help="captured `events` messages (one per line, JSON or `TOPIC JSON`)")
        else:
            a.add_argument("--kind", action="append", default=[], metavar="K",
                           help="only this kind (repeatable)")
            a.add_argument("--since", metavar="TIME", help="only records at or after this ISO 8601 time")
        a.set_defaults(handler=handler)
    p.set_defaults(handler=lambda _a: (p.print_help(), 2)[1])


def _files(args: argparse.Namespace) -> list[Path]:
    files: list[Path] = list(args.files) or log_files(args.state / "audit")
    if not files:
        raise ConfigError(f"no audit log under {args.state / 'audit'} (give --state DIR or FILES)")
    for f in files:
        if not f.is_file():
            raise ConfigError(f"audit log {f}: not found")
    return files


def _verify(args: argparse.Namespace) -> int:
    files = _files(args)
    pub_path = args.pub or args.state / SIGNING_PUB_FILE
    pub = load_trusted_key(pub_path)
    external: list[dict[str, Any]] = []
    if args.from_mqtt_capture is not None:
        try:
            external = checkpoints_from_capture(args.from_mqtt_capture)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--from-mqtt-capture: {exc}") from None
    if args.files:
        report = verify_log(files, pub=pub, external=external)
    else:
        report = verify_log(directory=args.state / "audit", pub=pub, external=external)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        if report.ok:
            print(f"audit log intact: {report.records} records ({report.first_seq}..{report.last_seq}), "
                  f"{report.checkpoints} signed checkpoints, {report.covered} records covered")
        if report.torn:
            print(f"note: torn record at the end: {report.torn}")
        if args.pub is None:
            print(f"note: checked against {pub_path} found on the device "
                  "(use the key copied at provisioning)", file=sys.stderr)
        for p in report.problems:
            print(f"edgeguard: audit log tampered: {p}", file=sys.stderr)
    return 0 if report.ok else EXIT_TAMPERED


def _since(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: {text!r} is not an ISO 8601 time") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _show(args: argparse.Namespace) -> int:
    since = _since(args.since) if args.since else None
    kinds = set(args.kind)
    for path in _files(args):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                rec = parse_line(line.rstrip(b"\n"))
                if rec is None:
                    print(f"{path.name} line {n}: not a valid record (run `edgeguard audit verify`)",
                          file=sys.stderr)
                    continue
                if kinds and rec.kind not in kinds:
                    continue
                if since is not None and _since(rec.time) < since:
                    continue
                if args.json:
                    print(json.dumps(rec.to_json()))
                else:
                    print(f"{rec.seq:>8} {rec.time} {rec.kind:<20} {json.dumps(rec.data, sort_keys=True)}")
    return 0
