"""``fleet init``: the fleet directory, its CA, keys, broker certificate and ``fleet.toml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from edgeguard._atomic import atomic_write
from edgeguard.errors import ConfigError
from edgeguard.keys import generate_keypair, load_trusted_key, public_key_id
from edgeguard.provisioning import new_private_file

from . import _pki as pki
from ._fleetdir import FleetConfig, FleetDir, parse_broker, render_fleet_toml
from ._inventory import Inventory
from ._issue import Issuer
from ._keyfiles import ensure_ec_key, ensure_ed25519, read_cert

__all__ = ["FleetIds", "init_fleet"]


@dataclass(frozen=True)
class FleetIds:
    publisher_key_id: str  # the fleet key id devices pin (provision --fleet-key-id)
    operator_key_id: str
    ca_fingerprint: str  # SHA-256 of the CA certificate (DER)


def init_fleet(
    root: Path, *, name: str, brokers: tuple[str, ...], groups: tuple[str, ...], api_port: int, force: bool
) -> tuple[FleetDir, FleetIds]:
    """Create the fleet directory (``force``: keys kept; broker certificate and fleet.toml renewed)."""
    cfg = FleetConfig(
        name=name, brokers=tuple(parse_broker(b) for b in brokers), groups=groups, device_api_port=api_port
    )
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ConfigError(f"{root} is not empty (--force writes into it; keys there are kept)")
    if (root / "fleet.toml").exists():
        old = FleetDir.open(root).config
        if old.name != name:
            raise ConfigError(f"{root} holds fleet {old.name!r}: its devices would not follow a rename")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("ca", "keys", "broker", "devices", "operators", "archives"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    fd = FleetDir(root, cfg)
    if fd.ca_key.exists():
        ca_key = ensure_ec_key(fd.ca_key)
        ca_cert = read_cert(fd.ca_cert)
        if ca_cert is None:
            raise ConfigError(f"{fd.ca_key} exists without {fd.ca_cert}")
    else:
        ca_key, ca_cert = pki.new_ca(name)
        new_private_file(fd.ca_key, pki.key_pem(ca_key))
        atomic_write(fd.ca_cert, pki.cert_pem(ca_cert), mode=0o644)
    if not fd.publisher_key.exists():
        generate_keypair("publisher", root / "keys")
    operator = ensure_ed25519(root / "keys/operator.key", fd.operator_pub)
    server_key = ensure_ec_key(fd.server_key)
    server = pki.issue_server_cert(ca_key, ca_cert, server_key, [b.host for b in cfg.brokers], fleet=name)
    atomic_write(fd.server_cert, pki.cert_pem(server), mode=0o644)
    atomic_write(root / "fleet.toml", render_fleet_toml(cfg).encode(), mode=0o644)
    with fd.locked():
        inv = Inventory.load(fd.inventory, name)
        Issuer(fd, inv).write_crl()
        inv.save(fd.inventory)
    return fd, FleetIds(
        publisher_key_id=public_key_id(load_trusted_key(fd.publisher_pub)),
        operator_key_id=public_key_id(operator),
        ca_fingerprint=ca_cert.fingerprint(hashes.SHA256()).hex(),
    )
