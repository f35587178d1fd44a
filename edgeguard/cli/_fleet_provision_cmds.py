"""``edgeguard fleet init | add-device | add-devices | sign-device | add-operator | broker-config |
revoke-device | revoke-operator | seal | devices``: fleet provisioning from the command line (docs/fleet.md).

Every command takes the fleet directory with ``-f/--fleet DIR`` (default ``$EDGEGUARD_FLEET`` or ``.``).
Private keys are written 0600 and never printed; what is printed is key ids, serials and paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

from ._bundle_cmds import _checked_expiry

if TYPE_CHECKING:
    from edgeguard.fleet.provision import FleetDir

__all__ = ["register_fleet"]

_RAW = argparse.RawDescriptionHelpFormatter

_INIT_HELP = """\
Create a fleet directory: the fleet CA, the publisher key (signs bundles and provisioning archives), the
operator command-signing key, the broker's server certificate (every --broker address as a SAN) and
fleet.toml. Private keys are 0600 and never printed. Prints the fleet key id devices pin.

example:
  edgeguard fleet init plant-a --broker broker.plant-a.lan:8883 --group line-1 --group line-2"""

_ADD_HELP = """\
Provision devices whose keys the fleet makes: per device a bundle key (X25519), a signing key (Ed25519), a
TLS client certificate (CN = the device id), API tokens and edgeguard.toml, packed into
archives/<id>.egp (0600; it holds the device's private keys: move it to the board and delete it).
Re-running gives the same keys and certificate; --rotate revokes the old certificate and issues new ones.

example:
  edgeguard fleet -f plant-a add-device cam-01 cam-02 --group line-1"""

_ADD_MANY_HELP = """\
Like add-device for every row of a CSV file: `id,groups` (header optional; several groups separated by
';'). A progress bar on a terminal, one summary line when piped.

example:
  printf 'id,groups\\ncam-01,line-1\\ncam-02,line-1;night\\n' > devices.csv
  edgeguard fleet -f plant-a add-devices devices.csv"""

_SIGN_HELP = """\
Certify a device that made its own keys (`edgeguard enroll` on the device): checks the CSR, issues the TLS
certificate and writes archives/<id>.egp without any private key, sealed (HPKE) to the device's key.

example:
  edgeguard fleet -f plant-a sign-device cam-07.csr --group line-2"""

_BROKER_HELP = """\
Write a mosquitto configuration for the fleet into DIR: TLS listener requiring fleet client certificates
(CN = MQTT user name = client id), the ACL (devices: only their own topics; operators: read all, write cmd),
the CRL of revoked certificates, max_packet_size, persistence.
Start it with `mosquitto -c DIR/mosquitto.conf`.
After add-operator or revoke-device, re-run it and send mosquitto SIGHUP (ACL and CRL apply to new
connections; restart mosquitto to also cut a revoked device that is connected).

example:
  edgeguard fleet -f plant-a broker-config -o /etc/mosquitto/edgeguard"""

_SEAL_HELP = """\
Seal a model for the fleet's current, non-revoked devices: --to all, group names and/or device ids.
Signed with the fleet's publisher key; devices outside the selection cannot open it (not a recipient).

example:
  edgeguard fleet -f plant-a seal yolov8n.onnx --name yolo --version 4 --to line-1 --meta yolo.json"""


def _fleet_dir(args: argparse.Namespace) -> FleetDir:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415 - operator code, loaded only when used

    return fp.FleetDir.open(args.fleet)


def register_fleet(fsub: argparse._SubParsersAction[Any]) -> None:
    default_fleet = Path(os.environ.get("EDGEGUARD_FLEET", "."))

    def add(
        name: str, help_: str, description: str, handler: Any, fleet_arg: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = fsub.add_parser(
            name, help=help_, description=description, formatter_class=_RAW
        )
        if fleet_arg:
            p.add_argument(
                "-f",
                "--fleet",
                type=Path,
                default=default_fleet,
                metavar="DIR",
                help="the fleet directory ($EDGEGUARD_FLEET or the current directory)",
            )
        p.set_defaults(handler=handler)
        return p

    p = add(
        "init",
        "create a fleet directory (CA, keys, broker certificate, fleet.toml)",
        _INIT_HELP,
        _init,
        fleet_arg=False,
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="the fleet directory to create")
    p.add_argument("--name", help="fleet name, the MQTT topic level (default: DIR's name)")
    p.add_argument(
        "--broker",
        action="append",
        required=True,
        metavar="HOST[:PORT]",
        help="broker address devices connect to (repeat: each goes into the certificate; "
        "the first is the devices' broker; port 8883 when omitted)",
    )
    p.add_argument("--group", action="append", default=[], metavar="NAME", help="declare a device group")
    p.add_argument("--api-port", type=int, default=8780, help="devices' local API port on 127.0.0.1")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR: keys kept, broker certificate and fleet.toml renewed",
    )

    p = add(
        "add-device", "provision devices (fleet-made keys) into per-device archives", _ADD_HELP, _add_device
    )
    p.add_argument("ids", nargs="+", metavar="ID", help="device ids")
    p.add_argument(
        "--group",
        action="append",
        metavar="NAME",
        help="group of these devices (repeatable; default: keep their groups)",
    )
    p.add_argument("--rotate", action="store_true", help="revoke the old certificate and issue new keys")

    p = add("add-devices", "provision every device of a CSV file (id,groups)", _ADD_MANY_HELP, _add_devices)
    p.add_argument("csv", type=Path, metavar="DEVICES.csv")
    p.add_argument("--rotate", action="store_true", help="revoke the old certificates and issue new keys")

    p = add(
        "sign-device",
        "certify a device that enrolled its own keys (CSR from `edgeguard enroll`)",
        _SIGN_HELP,
        _sign_device,
    )
    p.add_argument("csr", type=Path, metavar="CSR", help="device.csr from `edgeguard enroll`")
    p.add_argument("--group", action="append", metavar="NAME", help="group of this device (repeatable)")
    p.add_argument("--rotate", action="store_true", help="replace the keys the fleet has for this device")

    p = add(
        "add-operator",
        "issue an operator's broker certificate (CN op:NAME)",
        "Issue a TLS client certificate for an operator tool: operators/NAME/client.pem and client.key "
        "(0600), CN op:NAME, OU operators. The broker lets it read all the fleet's topics and write cmd. "
        "Re-run broker-config (and SIGHUP mosquitto) so the ACL names it. One certificate per tool: the "
        "broker uses the CN as client id.",
        _add_operator,
    )
    p.add_argument("name", metavar="NAME")

    p = add(
        "broker-config",
        "write the fleet's mosquitto configuration (TLS, ACL, CRL)",
        _BROKER_HELP,
        _broker_config,
    )
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (default: FLEET/broker/mosquitto)",
    )
    p.add_argument("--port", type=int, help="listener port (default: the first broker address's port)")
    p.add_argument("--bind", help="listen on this address only (default: every interface)")
    p.add_argument("--user", default="mosquitto", help="user mosquitto drops to (default: mosquitto)")

    p = add(
        "revoke-device",
        "revoke a device: CRL, no longer a bundle recipient, inventory",
        "Put the device's certificate on the CRL (ca/crl.pem), mark it revoked in the inventory (fleet "
        "seal leaves it out from now on). Then re-run broker-config and reload mosquitto (SIGHUP; a restart "
        "also cuts the device if it is connected).",
        _revoke_device,
    )
    p.add_argument("ids", nargs="+", metavar="ID")

    p = add(
        "revoke-operator",
        "revoke an operator's broker certificate",
        "Put the operator's certificate on the CRL and drop it from the ACL; then re-run broker-config and "
        "reload mosquitto.",
        _revoke_operator,
    )
    p.add_argument("name", metavar="NAME")

    p = add("seal", "seal a model for the fleet's devices (all, groups, ids)", _SEAL_HELP, _seal)
    p.add_argument("model", type=Path, metavar="MODEL", help="model file (.onnx or .tflite)")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", required=True, type=int, help="integer version, must grow with each release")
    p.add_argument("--to", required=True, nargs="+", metavar="TARGET", help="all, group names, device ids")
    p.add_argument("--meta", type=Path, metavar="FILE.json", help="inputs/outputs/preprocess/... (see pack)")
    golden = p.add_mutually_exclusive_group()
    golden.add_argument("--golden", type=Path, metavar="FILE.npz", help="golden vectors (see pack)")
    golden.add_argument(
        "--golden-from", type=Path, metavar="DIR", help="golden vectors from images (see pack)"
    )
    p.add_argument("--expires", metavar="ISO8601", help="devices refuse the bundle after this time")
    p.add_argument("--force", action="store_true", help="seal even when --expires is in the past (tests)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.egm",
        help="the sealed bundle (default: FLEET/bundles/NAME-vVERSION.egm)",
    )

    p = add(
        "devices",
        "list the inventory's devices",
        "List the fleet's devices (--json: inventory.json).",
        _devices,
    )
    p.add_argument("--json", action="store_true", help="print the inventory as JSON")


def _init(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    name = args.name or args.dir.resolve().name
    fd, ids = fp.init_fleet(
        args.dir,
        name=name,
        brokers=tuple(args.broker),
        groups=tuple(args.group),
        api_port=args.api_port,
        force=args.force,
    )
    print(
        f"fleet {name} in {fd.root}: CA ca/ca.pem (SHA-256 {ids.ca_fingerprint[:32]}...), broker certificate "
        f"for {', '.join(str(b) for b in fd.config.brokers)}"
    )
    print(
        f"fleet key id {ids.publisher_key_id} (devices pin it: edgeguard provision --fleet-key-id "
        f"{ids.publisher_key_id}); operator key id {ids.operator_key_id}"
    )
    return 0


def _progress(total: int) -> Any:
    """A rich progress bar on stderr when that is a terminal; None when piped (stdout then gets one summary
    line, and a script reading stdout never sees the bar)."""
    if total < 2 or not sys.stderr.isatty():
        return None
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    return Progress(
        TextColumn("provisioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _provision_many(fd: FleetDir, rows: list[tuple[str, tuple[str, ...] | None]], rotate: bool) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        issuer = fp.Issuer(fd, inv)
        progress = _progress(len(rows))
        task = progress.add_task("devices", total=len(rows)) if progress is not None else None
        try:
            if progress is not None:
                progress.start()
            done = 0
            for device_id, groups in rows:
                rec = issuer.add_device(device_id, groups, rotate=rotate)
                issuer.write_archive(rec)
                done += 1
                if progress is not None:
                    progress.update(task, advance=1)
                elif len(rows) == 1:
                    print(
                        f"{rec.id}: archive {fd.archive(rec.id)} (bundle key {rec.bundle_key_id}, "
                        f"certificate {rec.cert_serial[:16]}..., groups {','.join(rec.groups) or '-'})"
                    )
        finally:
            if progress is not None:
                progress.stop()
            # What was issued before a failure is kept: the inventory must list every certificate issued.
            if rotate or issuer.crl_stale:
                issuer.write_crl()
            inv.save(fd.inventory)
    if len(rows) > 1:
        print(f"provisioned {done} device(s) of fleet {fd.config.name}: archives in {fd.root / 'archives'}")
    return 0


def _add_device(args: argparse.Namespace) -> int:
    groups = tuple(args.group) if args.group is not None else None
    return _provision_many(_fleet_dir(args), [(i, groups) for i in args.ids], args.rotate)


def _add_devices(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    rows = fp.read_devices_csv(args.csv)
    if not rows:
        raise ConfigError(f"{args.csv}: no devices")
    return _provision_many(_fleet_dir(args), [(i, g) for i, g in rows], args.rotate)


def _sign_device(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    from edgeguard.fleet.provision._issue import MAX_CSR_BYTES  # noqa: PLC0415

    csr = read_checked(args.csr, what="CSR", limit=MAX_CSR_BYTES, error=ConfigError).data
    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        issuer = fp.Issuer(fd, inv)
        rec = issuer.sign_device(
            csr, tuple(args.group) if args.group is not None else None, rotate=args.rotate
        )
        path = issuer.write_archive(rec)
        if args.rotate or issuer.crl_stale:
            issuer.write_crl()
        inv.save(fd.inventory)
    print(
        f"{rec.id}: certificate {rec.cert_serial[:16]}..., archive {path} (sealed to device key "
        f"{rec.bundle_key_id}; holds no private key)"
    )
    return 0


def _add_operator(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        _rec, d = fp.Issuer(fd, inv).add_operator(args.name)
        inv.save(fd.inventory)
    print(
        f"operator {args.name}: {d / 'client.pem'} and {d / 'client.key'} (CN op:{args.name}); "
        "re-run broker-config and reload mosquitto (SIGHUP) to admit it"
    )
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    out = args.out or fd.root / "broker/mosquitto"
    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        # A fresh CRL each time (valid a year from now): re-running broker-config is how it is renewed.
        fp.Issuer(fd, inv).write_crl()
        files = fp.write_broker_config(fd, inv, out, port=args.port, bind=args.bind, run_as=args.user)
    revoked = len(inv.revoked_certs)
    print(
        f"mosquitto config for fleet {fd.config.name}: {files.conf} (port {files.port}, ACL {files.acl}, "
        f"CRL with {revoked} revoked certificate(s), max_packet_size {fp.MAX_PACKET_SIZE})"
    )
    print(f"start: mosquitto -c {files.conf}")
    return 0


def _revoke_device(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        issuer = fp.Issuer(fd, inv)
        for device_id in args.ids:
            rec = issuer.revoke_device(device_id)
            print(
                f"revoked {rec.id}: certificate {rec.cert_serial[:16]}... on {fd.crl}; no longer a recipient"
            )
        inv.save(fd.inventory)
    print(
        "next: edgeguard fleet broker-config -o <broker dir>, then SIGHUP mosquitto "
        "(restart it to also drop a revoked device that is connected now)"
    )
    return 0


def _revoke_operator(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    with fd.locked():
        inv = fp.Inventory.load(fd.inventory, fd.config.name)
        rec = fp.Issuer(fd, inv).revoke_operator(args.name)
        inv.save(fd.inventory)
    print(f"revoked operator {rec.name}: certificate {rec.cert_serial[:16]}... on {fd.crl}")
    return 0


def _seal(args: argparse.Namespace) -> int:
    from edgeguard.bundle import load_golden_npz, load_meta, read_model  # noqa: PLC0415
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    if args.version < 0:
        raise ConfigError("--version must be a non-negative integer")
    fd = _fleet_dir(args)
    not_after = _checked_expiry(args, datetime.now(timezone.utc))
    out: Path = args.output or fd.root / "bundles" / f"{args.name}-v{args.version}.egm"
    if args.output is None:
        out.parent.mkdir(mode=0o755, exist_ok=True)
    elif not out.parent.is_dir():
        raise ConfigError(f"-o {out}: directory {out.parent} does not exist")
    model, model_format = read_model(args.model)
    meta = load_meta(args.meta) if args.meta else None
    golden: Any = load_golden_npz(args.golden) if args.golden else ()
    if args.golden_from:
        from ._golden import golden_from_images  # noqa: PLC0415

        golden = golden_from_images(args.golden_from, model=model, model_format=model_format, meta=meta or {})
    inv = fp.Inventory.load(fd.inventory, fd.config.name)
    data, chosen = fp.seal_for_fleet(
        fd,
        inv,
        model=model,
        model_format=model_format,
        name=args.name,
        version=args.version,
        targets=list(args.to),
        golden=golden,
        meta=meta,
        not_after=not_after,
    )
    atomic_write(out, data, mode=0o644)
    names = ", ".join(d.id for d in chosen[:10]) + (
        f" and {len(chosen) - 10} more" if len(chosen) > 10 else ""
    )
    print(f"sealed {args.name} v{args.version} for {len(chosen)} device(s) ({names}) -> {out}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from edgeguard.fleet import provision as fp  # noqa: PLC0415

    fd = _fleet_dir(args)
    inv = fp.Inventory.load(fd.inventory, fd.config.name)
    if args.json:
        json.dump(inv.to_json(), sys.stdout, indent=1)
        print()
        return 0
    print(f"{'DEVICE':<24} {'STATE':<8} {'GROUPS':<24} {'BUNDLE KEY':<17} CERT SERIAL")
    for d in sorted(inv.devices.values(), key=lambda r: r.id):
        print(
            f"{d.id:<24} {d.state:<8} {','.join(d.groups) or '-':<24} "
            f"{d.bundle_key_id:<17} {d.cert_serial[:16]}"
        )
    return 0
