"""``fleet broker-config``: a mosquitto configuration generated from the fleet (docs/fleet.md, "The broker").

One TLS listener that requires a client certificate issued by the fleet CA and not on the CRL; the
certificate's CN becomes the MQTT user name (``use_identity_as_username``) and the client id
(``use_username_as_clientid``: a device cannot take over another's session by choosing its client id). The
ACL gives each device its own topics only, and operators (CN ``op:<name>``) read everything and write ``cmd``,
``bundles/#`` (deploy chunks) and ``rollouts/#`` (rollout progress); a device's site connection (CN
``site:<device>``, a second certificate for the same key) its groups' topics.
mosquitto (2.0.11, tested) re-reads ``acl_file`` and the CRL on SIGHUP and applies them to new connections;
a revoked device that is connected at that moment keeps its session until it reconnects, so cutting it at
once takes a restart (docs/fleet.md, tests/fleet/test_provision_broker.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

from ._fleetdir import FleetDir
from ._inventory import Inventory
from ._pki import OPERATOR_CN_PREFIX, SITE_CN_PREFIX

__all__ = ["BrokerFiles", "write_broker_config", "MAX_PACKET_SIZE", "DEVICE_WRITE", "DEVICE_READ"]

# Results and events are at most 256 KiB (outbox.max_payload_bytes), inputs at most link.inbound_max_bytes:
# 1 MiB leaves room and stops a client from making the broker buffer more.
MAX_PACKET_SIZE = 1024 * 1024
DEVICE_WRITE = ("status", "heartbeat", "results", "events", "cmd/resp")
DEVICE_READ = ("cmd", "input")


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    acl: Path
    crl: Path
    port: int


def _acl(fd: FleetDir, inv: Inventory) -> str:
    prefix = fd.config.topic_prefix
    lines = [
        f"# ACL for EdgeGuard fleet {fd.config.name}, made by `edgeguard fleet broker-config`.",
        "# %u is the client certificate's CN: the device id for devices, op:<name> for operators.",
        "# Devices: publish only under their own prefix (never cmd), read only their own cmd and input.",
    ]
    lines += [f"pattern write {prefix}/%u/{t}" for t in DEVICE_WRITE]
    lines += [f"pattern read {prefix}/%u/{t}" for t in DEVICE_READ]
    lines += [
        "# Sealed bundles in chunks (docs/fleet.md, Deploy): every device reads them (each is encrypted for",
        "# its recipients); only operators publish them.",
        f"pattern read {prefix}/bundles/#",
    ]
    lines += _group_acl(prefix, inv)
    active = sorted(n for n, o in inv.operators.items() if o.state == "active")
    lines += [
        "",
        "# Operators (`edgeguard fleet add-operator NAME`): read everything of the fleet, write cmd, publish",
        "# bundles for deploys (bundles/<sha256>/...) and rollout progress (rollouts/<id>).",
    ]
    for name in active:
        lines += [
            f"user {OPERATOR_CN_PREFIX}{name}",
            f"topic read {prefix}/#",
            f"topic write {prefix}/+/cmd",
            f"topic write {prefix}/bundles/#",
            f"topic readwrite {prefix}/rollouts/#",
            # A gateway feeding site groups runs with an operator identity (docs/sites.md).
            f"topic write {prefix}/group/+/input",
            f"topic write {prefix}/group/+/stream/+/input",
            "",
        ]
    return "\n".join(lines) + "\n"


def _group_acl(prefix: str, inv: Inventory) -> list[str]:
    """Site groups (docs/sites.md): the site connection of a member (its second certificate, CN
    ``site:<device>``: the CN is the client id, so it needs its own) reads its groups' input (as a shared
    subscription), stream inputs, leases, member states and its own probe; writes leases, and its own member
    status and probe only. The link's identity (CN ``<device>``) gets no group topic."""
    lines = [
        "",
        "# Site groups: the site connection of each member (CN site:<device>, docs/sites.md).",
    ]
    for dev_id, dev in sorted(inv.devices.items()):
        if dev.state != "active" or not dev.groups or dev.site_cert_serial is None:
            continue
        lines.append(f"user {SITE_CN_PREFIX}{dev_id}")
        for g in sorted(set(dev.groups)):
            base = f"{prefix}/group/{g}"
            # mosquitto 2.0.11 checks a shared subscription's deliveries against the plain topic (a
            # "$share/..." ACL line has no effect) and grants the SUBSCRIBE itself to anyone (docs/sites.md).
            lines += [
                f"topic read {base}/input",
                f"topic read {base}/stream/+/input",
                f"topic readwrite {base}/lease/+",
                f"topic read {base}/member/+",
                f"topic write {base}/member/{dev_id}",
                f"topic readwrite {base}/probe/{dev_id}",
            ]
        lines.append("")
    return lines


def write_broker_config(
    fd: FleetDir,
    inv: Inventory,
    out: Path,
    *,
    port: int | None = None,
    bind: str | None = None,
    run_as: str = "mosquitto",
) -> BrokerFiles:
    """Write ``out/{mosquitto.conf, acl, ca.pem, server.pem, server.key, crl.pem}`` and ``out/data/``.
    ``port`` defaults to the first broker address's port; ``bind`` to every interface."""
    listen = port if port is not None else fd.config.brokers[0].port
    if not 1 <= listen <= 65535:
        raise ConfigError(f"--port {listen}: must be 1..65535")
    if not fd.crl.exists():
        raise ConfigError(f"{fd.crl} missing: run `edgeguard fleet init --force` in {fd.root}")
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    (out / "data").mkdir(mode=0o700, exist_ok=True)
    out = out.resolve()

    def copy(src: Path, name: str, mode: int) -> Path:
        data = read_checked(src, what=name, limit=64 * 1024, error=ConfigError).data
        atomic_write(out / name, data, mode=mode)
        return out / name

    copy(fd.ca_cert, "ca.pem", 0o644)
    copy(fd.server_cert, "server.pem", 0o644)
    copy(fd.server_key, "server.key", 0o600)
    crl = copy(fd.crl, "crl.pem", 0o644)
    acl = out / "acl"
    atomic_write(acl, _acl(fd, inv).encode(), mode=0o644)
    if os.geteuid() == 0 and run_as != "root":
        import pwd  # noqa: PLC0415

        try:
            entry = pwd.getpwnam(run_as)
        except KeyError:
            entry = None
        if entry is not None:  # mosquitto drops to this user: it must still read its key and write data/
            for p in (out / "server.key", out / "data"):
                os.chown(p, entry.pw_uid, entry.pw_gid)
    listener = f"listener {listen} {bind}" if bind else f"listener {listen}"
    conf = f"""\
# mosquitto configuration for EdgeGuard fleet {fd.config.name}, made by `edgeguard fleet broker-config`.
# Run: mosquitto -c {out / "mosquitto.conf"}   (docs/fleet.md: reload, revocation, other brokers)
user {run_as}
per_listener_settings false
allow_anonymous false
persistence true
persistence_location {out / "data"}/
autosave_interval 60
max_packet_size {MAX_PACKET_SIZE}
max_queued_messages 10000
# Small packets (command answers, acks) go out at once instead of waiting ~40 ms for Nagle's algorithm.
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
acl_file {acl}

{listener}
cafile {out / "ca.pem"}
certfile {out / "server.pem"}
keyfile {out / "server.key"}
crlfile {crl}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
"""
    conf_path = out / "mosquitto.conf"
    atomic_write(conf_path, conf.encode(), mode=0o644)
    return BrokerFiles(conf=conf_path, acl=acl, crl=crl, port=listen)
