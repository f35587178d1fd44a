"""``edgeguard enroll`` and ``edgeguard provision``: the device side of fleet provisioning (docs/fleet.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeguard.provisioning import enroll, install_archive

__all__ = ["register"]

_RAW = argparse.RawDescriptionHelpFormatter

_ENROLL_HELP = """\
Make this device's keys here, so that no private key ever leaves it: DIR/device.key (X25519, bundles),
DIR/device-sign.key (Ed25519, command answers), DIR/client.key (P-256, TLS), all 0600, and DIR/device.csr,
which carries the device id and the public keys. Give device.csr to the operator (`edgeguard fleet
sign-device`); install the archive that comes back with `edgeguard provision ARCHIVE --keys DIR`.
Re-running keeps the keys.

example:
  edgeguard enroll --id cam-07 --out /root/enroll --fleet-key-id 3f2a9c0d1e4b5a67"""

_PROVISION_HELP = """\
Install a provisioning archive made by `edgeguard fleet add-device` / `sign-device`: checks the fleet's
signature against the pinned fleet key id, then writes /etc/edgeguard (config, certificates, keys; the device
key and API tokens where the systemd unit loads its credentials from) and creates /var/lib/edgeguard.
Re-running with the same archive changes nothing. Exit 3 when the archive is refused (stderr names the check).

example:
  edgeguard provision cam-07.egp --fleet-key-id 3f2a9c0d1e4b5a67
  edgeguard provision cam-07.egp --keys /root/enroll          # an enrolled device (sealed archive)"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "enroll",
        help="make this device's keys and a CSR (private keys stay here)",
        description=_ENROLL_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("--id", required=True, help="the device id (1..64 of A-Z a-z 0-9 _ . -)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the keys and device.csr go")
    p.add_argument(
        "--fleet-key-id",
        metavar="KEYID",
        help="pin the fleet's key id now (printed by `fleet init`), so provision needs no flag",
    )
    p.set_defaults(handler=_enroll)

    p = sub.add_parser(
        "provision",
        help="install a fleet provisioning archive on this device",
        description=_PROVISION_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("archive", type=Path, metavar="ARCHIVE", help="the device's .egp archive")
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="install below this directory (tests, images)"
    )
    p.add_argument(
        "--fleet-key-id",
        metavar="KEYID",
        help="the fleet key id the archive must be signed with (default: the fleet key the device "
        "already has, or the one pinned at enroll)",
    )
    p.add_argument(
        "--keys", type=Path, metavar="DIR", help="the enroll directory of a device that made its keys"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="re-provision a board that is provisioned as another device (default: refuse)",
    )
    p.set_defaults(handler=_provision)


def _enroll(args: argparse.Namespace) -> int:
    e = enroll(args.id, args.out, fleet_key_id=args.fleet_key_id)
    how = "made" if e.created else "kept (already there)"
    print(
        f"enrolled {args.id}: keys {how} in {args.out} (device key {e.device_key_id}, signing key "
        f"{e.sign_key_id}); send {e.csr} to the operator (edgeguard fleet sign-device)"
    )
    return 0


def _provision(args: argparse.Namespace) -> int:
    r = install_archive(
        args.archive, root=args.root, fleet_key_id=args.fleet_key_id, keys_dir=args.keys, replace=args.replace
    )
    changed = (
        f"{len(r.written)} file(s) written, {len(r.unchanged)} unchanged" if r.written else "nothing changed"
    )
    print(f"provisioned {r.device} of fleet {r.fleet} into {r.etc} ({changed}); state in {r.state}")
    return 0
