"""A real device service with ``[commands]`` enabled, operator keys, and a connected operator-side sender."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.fleet.commands import CommandSender, Delivery, SignedCommand, parse_target, sign_command
from edgeguard.keys import generate_keypair, load_signing_key, load_verify_key, public_key_id
from edgeguard.link import LinkConfig
from tests.service._env import Device, tiny_bundle
from tests.support.broker import MosquittoBroker

FLEET = "test"


def operator(root: Path, name: str) -> Ed25519PrivateKey:
    d = root / name
    if not (d / "operator.key").exists():
        generate_keypair("operator", d)
    return load_signing_key(d / "operator.key")


def commands_device(
    root: Path,
    broker: MosquittoBroker,
    *,
    groups: tuple[str, ...] = ("line-2",),
    max_bytes: int = 4096,
    skew_s: float = 5.0,
    link_extra: str = "",
) -> tuple[Device, Ed25519PrivateKey]:
    """Provisioned (not started): operator key ``ops`` trusted, ``ops-revoked`` trusted and revoked."""
    dev = Device(root=root, broker=broker)
    dev.provision(tiny_bundle(root), link_extra=link_extra)
    ops = operator(root, "ops")
    revoked = operator(root, "ops-revoked")
    (root / "operators-revoked.txt").write_text(f"{public_key_id(revoked.public_key())}  # lost laptop\n")
    text = dev.config.read_text().replace(
        f'fleet = "{FLEET}"\n', f'fleet = "{FLEET}"\ngroups = {list(groups)!r}\n'.replace("'", '"'), 1
    )
    text += f"""
[commands]
enabled = true
operator_keys = ["ops/operator.pub", "ops-revoked/operator.pub"]
revocations = "operators-revoked.txt"
max_bytes = {max_bytes}
max_clock_skew_s = {skew_s}
"""
    dev.config.write_text(text)
    return dev, ops


def sender(broker: MosquittoBroker, root: Path | None = None) -> CommandSender:
    """Connected; pins the device's answer key when ``root`` (the device's dir) holds it already."""
    pinned = {}
    if root is not None and (root / "state/device-sign.pub").exists():
        pinned["dev-1"] = load_verify_key(root / "state/device-sign.pub", "device-sign")
    s = CommandSender(broker=LinkConfig(host=broker.host, port=broker.port), fleet=FLEET, pinned=pinned)
    s.connect()
    return s


def sign(
    key: Ed25519PrivateKey,
    name: str,
    *,
    to: str = "dev-1",
    args: Mapping[str, str] | None = None,
    now: int | None = None,
    ttl_s: int = 60,
    fleet: str = FLEET,
) -> SignedCommand:
    return sign_command(
        key,
        fleet=fleet,
        target=parse_target(to, fleet),
        name=name,
        args=args or {},
        now=int(time.time()) if now is None else now,
        ttl_s=ttl_s,
    )


def deliver(s: CommandSender, cmd: SignedCommand, device: str = "dev-1", timeout: float = 20.0) -> Delivery:
    """Send and return the one device's delivery; fails the test when no verified answer came."""
    report = s.send(cmd, timeout=timeout, devices=[device])
    d = report.deliveries[device]
    assert d.answer is not None, f"no verified answer to {cmd.name} (forged: {[f.why for f in d.forged]})"
    return d
