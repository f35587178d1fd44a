"""The fleet directory: ``fleet.toml`` (typed, checked), where each file lives, and the lock that serialises
the fleet commands that change it.

Layout (private keys 0600, the directory 0700)::

    fleet.toml                 name, broker addresses, topic prefix, groups, device API port
    inventory.json             devices and operators (atomic writes; see _inventory.py)
    ca/ca.key ca/ca.pem        the fleet CA; ca/crl.pem the revoked certificates
    keys/publisher.key .pub    signs bundles and provisioning archives
    keys/operator.key .pub     signs operator commands (Ed25519, the publisher key's PEM format)
    broker/server.key .pem     the broker's TLS identity (SANs: every broker address)
    devices/<id>/              per device: keys (unless enrolled), certificate, tokens, edgeguard.toml
    operators/<name>/          per operator: client.key, client.pem (CN op:<name>)
    archives/<id>.egp          per-device provisioning archives (0600)
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["FleetConfig", "BrokerAddress", "FleetDir", "ID_RE", "parse_broker", "render_fleet_toml"]

ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # device ids, fleet, group and operator names (a topic level)
DEFAULT_MQTTS_PORT = 8883
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_MAX_FLEET_TOML = 64 * 1024


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int = DEFAULT_MQTTS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_broker(text: str) -> BrokerAddress:
    """``HOST[:PORT]`` / ``[IPv6]:PORT``; the host (a SAN) is a DNS name or an IP address."""
    value = text.strip()
    host, port = value, DEFAULT_MQTTS_PORT
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"broker address {text!r}: expected [IPv6]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif value.count(":") == 1:
        host, p = value.split(":")
        port = _port(p, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"broker address {text!r}: not a host name or IP address") from None
    return BrokerAddress(host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"broker address {whole!r}: port must be 1..65535")
    return int(text)


@dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """``fleet.toml``. The topic prefix is fixed by the device contract (edgeguard/v1/<name>); it is written
    to the file so that people and other tools read it there, and refused when edited to anything else."""

    name: str
    brokers: tuple[BrokerAddress, ...]
    groups: tuple[str, ...] = ()
    device_api_port: int = 8780

    def __post_init__(self) -> None:
        if not ID_RE.fullmatch(self.name):
            raise ConfigError(f"fleet name {self.name!r}: 1..64 of A-Z a-z 0-9 _ . -")
        if not self.brokers:
            raise ConfigError("a fleet needs at least one broker address (--broker HOST[:PORT])")
        for g in self.groups:
            if not ID_RE.fullmatch(g) or g == "all":
                raise ConfigError(f"group name {g!r}: 1..64 of A-Z a-z 0-9 _ . - (and not 'all')")
        if not 1 <= self.device_api_port <= 65535:
            raise ConfigError("device_api_port must be 1..65535")

    @property
    def topic_prefix(self) -> str:
        return f"edgeguard/v1/{self.name}"


def render_fleet_toml(cfg: FleetConfig) -> str:
    def strings(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return (
        "# EdgeGuard fleet, made by `edgeguard fleet init` (docs/fleet.md). Device topics:\n"
        "# <topic_prefix>/<device id>/{status,heartbeat,results,events,cmd,cmd/resp,input}\n"
        f'name = "{cfg.name}"\n'
        f"brokers = {strings(tuple(str(b) for b in cfg.brokers))}   # the first is the devices' broker\n"
        f'topic_prefix = "{cfg.topic_prefix}"   # fixed by the device contract\n'
        f"groups = {strings(cfg.groups)}   # declared groups (devices may also carry their own)\n"
        f"device_api_port = {cfg.device_api_port}   # local API port (127.0.0.1) on each device\n"
    )


def _parse_fleet_toml(text: str, path: Path) -> FleetConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {"name", "brokers", "topic_prefix", "groups", "device_api_port"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    name, brokers, groups = doc.get("name"), doc.get("brokers"), doc.get("groups", [])
    if not isinstance(name, str):
        raise ConfigError(f"{path}: name must be a string")
    if not isinstance(brokers, list) or not all(isinstance(b, str) for b in brokers):
        raise ConfigError(f"{path}: brokers must be a list of HOST:PORT strings")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ConfigError(f"{path}: groups must be a list of names")
    port = doc.get("device_api_port", 8780)
    if type(port) is not int:
        raise ConfigError(f"{path}: device_api_port must be an integer")
    cfg = FleetConfig(
        name=name, brokers=tuple(parse_broker(b) for b in brokers), groups=tuple(groups), device_api_port=port
    )
    if doc.get("topic_prefix", cfg.topic_prefix) != cfg.topic_prefix:
        raise ConfigError(f"{path}: topic_prefix must be {cfg.topic_prefix!r} (the device topic contract)")
    return cfg


@dataclass(frozen=True)
class FleetDir:
    root: Path
    config: FleetConfig = field(compare=False)

    @classmethod
    def open(cls, root: Path) -> FleetDir:
        path = root / "fleet.toml"
        if not path.is_file():
            raise ConfigError(f"{root} is not a fleet directory (no fleet.toml; run `edgeguard fleet init`)")
        data = read_checked(path, what="fleet config", limit=_MAX_FLEET_TOML, error=ConfigError).data
        return cls(root, _parse_fleet_toml(data.decode("utf-8", "replace"), path))

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.json"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca/ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca/ca.pem"

    @property
    def crl(self) -> Path:
        return self.root / "ca/crl.pem"

    @property
    def publisher_key(self) -> Path:
        return self.root / "keys/publisher.key"

    @property
    def publisher_pub(self) -> Path:
        return self.root / "keys/publisher.pub"

    @property
    def operator_pub(self) -> Path:
        return self.root / "keys/operator.pub"

    @property
    def server_key(self) -> Path:
        return self.root / "broker/server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "broker/server.pem"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def operator_dir(self, name: str) -> Path:
        return self.root / "operators" / name

    def archive(self, device_id: str) -> Path:
        return self.root / "archives" / f"{device_id}.egp"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One changing fleet command at a time: two `add-device` runs must not both read the inventory,
        each add their device and the last writer drop the other's (flock: released if the process dies)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
