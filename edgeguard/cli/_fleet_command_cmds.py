"""``edgeguard fleet send``: sign a remote command with an operator key, publish it, show the verified answers
(docs/commands.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeguard.errors import ConfigError

_SEND_HELP = """\
Sign a command with an operator key and publish it on each target's cmd topic; print every answer as it
arrives, marked ✓ (signature verified with that device's key) or ✗ (forged: it is not). Device keys given
with --device-keys are pinned; without one, a device's key is learned from its retained birth status, which
is only as trustworthy as the broker's ACL on that topic (marked "learned key").
Targets: a device id, group:NAME (online devices whose status lists the group) or all (every online device).
Exit 0 when every target answered ok, 1 otherwise (refused, forged only, or no answer in time).

example:
  edgeguard fleet send ping --to dev-1 --sign-key ops/operator.key --fleet plant-a --broker mqtt.local:8883 \\
      --ca-file fleet/ca.pem --device-keys fleet/devices
  edgeguard fleet send set-log-level level=DEBUG --to group:line-2 --sign-key ops/operator.key \\
      --fleet plant-a --broker 127.0.0.1:1883"""

_COMMANDS = ("ping", "status", "reload", "restart", "set-log-level", "rotate-tokens", "deploy", "rollback")


def register_fleet(fsub: argparse._SubParsersAction[Any]) -> None:
    p = fsub.add_parser(
        "send",
        help="sign and send a remote command; show the devices' verified answers",
        description=_SEND_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="CMD", help=f"command name ({', '.join(_COMMANDS)})")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", help="command arguments")
    p.add_argument("--to", required=True, metavar="ID|group:G|all", help="the command's target")
    p.add_argument("--sign-key", required=True, type=Path, metavar="operator.key", help="operator key")
    p.add_argument("--fleet", required=True, help="fleet name (topic level after edgeguard/v1/)")
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker")
    p.add_argument("--ca-file", type=Path, help="enables TLS: verify the broker against this CA")
    p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="client certificate's key (mutual TLS)")
    p.add_argument("--tls-server-name", help="name to expect in the broker certificate")
    p.add_argument("--username", help="MQTT user name (password from $EDGEGUARD_MQTT_PASSWORD)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version")
    p.add_argument(
        "--device-keys",
        action="append",
        default=[],
        metavar="DIR|ID=FILE",
        help="pinned answer keys: DIR/<ID>/device-sign.pub or DIR/<ID>.pub, or ID=FILE (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for answers")
    p.add_argument("--ttl", type=int, default=300, metavar="S", help="command validity in seconds")
    p.add_argument("--json", action="store_true", help="one JSON report at the end instead of lines")
    p.set_defaults(handler=_send)


def _parse_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item[:80]!r}: use KEY=VALUE")
        out[key] = value
    return out


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--broker {text[:80]!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


def pinned_keys(specs: list[str]) -> dict[str, Ed25519PublicKey]:
    from edgeguard.keys import load_verify_key  # noqa: PLC0415

    out: dict[str, Ed25519PublicKey] = {}
    for spec in specs:
        device, sep, file = spec.partition("=")
        if sep:
            out[device] = load_verify_key(Path(file), "device-sign")
            continue
        root = Path(spec)
        if not root.is_dir():
            raise ConfigError(f"--device-keys {spec!r}: not a directory (or use ID=FILE)")
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and (entry / "device-sign.pub").is_file():
                out[entry.name] = load_verify_key(entry / "device-sign.pub", "device-sign")
            elif entry.suffix == ".pub" and entry.is_file():
                out[entry.stem] = load_verify_key(entry, "device-sign")
    return out


def _line(ans: Any, latency: float | None) -> str:
    ms = f"{latency * 1000:.0f} ms" if latency is not None else ""
    if not ans.trusted:
        what = "FORGED answer" if ans.verdict == "forged" else "unverifiable answer"
        return f"✗ {ans.device}  {what}: {ans.why}  {ms}"
    doc = ans.doc
    learned = " (learned key)" if ans.verdict != "verified" else ""
    if doc.get("ok") is True:
        result = json.dumps(doc.get("result"), sort_keys=True)
        if len(result) > 200:
            result = result[:200] + "..."
        return f"✓ {ans.device}{learned}  ok  {result}  {ms}"
    return f"✓ {ans.device}{learned}  refused: {doc.get('check')}: {doc.get('reason')}  {ms}"


def _send(args: argparse.Namespace) -> int:
    from edgeguard.fleet.commands import CommandSender, parse_target, sign_command  # noqa: PLC0415
    from edgeguard.keys import load_signing_key  # noqa: PLC0415
    from edgeguard.link import LinkConfig  # noqa: PLC0415

    if not 0 < args.timeout <= 3600:
        raise ConfigError("--timeout: must be 0..3600 s")
    host, port = _broker(args.broker)
    try:
        broker = LinkConfig(
            host=host,
            port=port,
            protocol=args.protocol,
            username=args.username,
            password=os.environ.get("EDGEGUARD_MQTT_PASSWORD") if args.username else None,
            ca_file=args.ca_file,
            client_cert=args.cert,
            client_key=args.key,
            tls_server_name=args.tls_server_name,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    key = load_signing_key(args.sign_key, "operator")
    try:
        target = parse_target(args.to, args.fleet)
    except ValueError as exc:
        raise ConfigError(f"--to: {exc}") from None
    sender = CommandSender(broker=broker, fleet=args.fleet, pinned=pinned_keys(args.device_keys))
    sender.connect()
    try:
        try:
            cmd = sign_command(
                key,
                fleet=args.fleet,
                target=target,
                name=args.name,
                args=_parse_args(args.args),
                now=int(time.time()),
                ttl_s=args.ttl,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

        def show(ans: Any, latency: float | None) -> None:
            if not args.json:
                print(_line(ans, latency), flush=True)

        report = sender.send(cmd, timeout=args.timeout, on_answer=show)
    finally:
        sender.close()
    missing = [d for d, dl in report.deliveries.items() if dl.answer is None]
    if args.json:
        doc = {
            "nonce": cmd.nonce,
            "command": cmd.name,
            "ok": report.all_ok,
            "skipped": report.skipped,
            "answers": [
                {
                    "device": d.device,
                    "verdict": d.answer.verdict if d.answer else None,
                    "latency_ms": round(d.latency_s * 1000, 1) if d.latency_s is not None else None,
                    "answer": dict(d.answer.doc) if d.answer else None,
                    "forged": [f.why for f in d.forged],
                }
                for d in report.deliveries.values()
            ],
        }
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        for device, why in report.skipped.items():
            print(f"- {device}  skipped: {why}")
        for device in missing:
            print(f"? {device}  no verified answer within {args.timeout:g} s")
        ok = sum(1 for d in report.deliveries.values() if d.answer is not None and d.answer.ok)
        print(f"{ok}/{len(report.deliveries)} answered ok (command {cmd.name}, nonce {cmd.nonce})")
    if not report.deliveries:
        hint = ""
        if target[0] != "device" and not sender.statuses:
            # A group or the fleet is resolved from the devices' retained statuses; RabbitMQ's MQTT plugin
            # does not hand retained messages to a wildcard subscription, so there none is ever seen.
            hint = (
                " (no device status seen at all: a broker that does not deliver retained messages to "
                "wildcard subscriptions, such as RabbitMQ's MQTT plugin, hides them; name the devices with "
                "--to ID, see docs/fleet.md)"
            )
        print(f"edgeguard: no device to send to for --to {args.to}{hint}", file=sys.stderr)
    return 0 if report.all_ok else 1
