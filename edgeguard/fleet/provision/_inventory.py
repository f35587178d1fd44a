"""The fleet inventory: ``inventory.json``, every device and operator the fleet issued, written atomically.

    {"version": 1, "fleet": F,
     "devices": {ID: {"groups": [...], "bundle_key_id": K, "signing_key_id": K, "cert_serial": HEX,
                      "site_cert_serial": HEX | null,    # CN site:ID, while the device is in a group
                      "state": "active" | "revoked", "enrolled": "fleet" | "device",
                      "added": ISO8601, "revoked_at": ISO8601 | null}},
     "operators": {NAME: {"cert_serial": HEX, "state": ..., "added": ..., "revoked_at": ...}},
     "revoked_certs": [{"serial": HEX, "at": ISO8601, "cn": CN}]}     # what the CRL lists

``revoked_certs`` also keeps certificates replaced by ``--rotate``: a rotated-away key must not get back in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

__all__ = ["DeviceRecord", "OperatorRecord", "RevokedCert", "Inventory"]

_MAX_INVENTORY = 256 * 1024 * 1024
State = Literal["active", "revoked"]


@dataclass
class DeviceRecord:
    id: str
    groups: tuple[str, ...]
    bundle_key_id: str
    signing_key_id: str
    cert_serial: str
    enrolled: Literal["fleet", "device"]
    added: str
    state: State = "active"
    revoked_at: str | None = None
    site_cert_serial: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "bundle_key_id": self.bundle_key_id,
            "signing_key_id": self.signing_key_id,
            "cert_serial": self.cert_serial,
            "site_cert_serial": self.site_cert_serial,
            "state": self.state,
            "enrolled": self.enrolled,
            "added": self.added,
            "revoked_at": self.revoked_at,
        }


@dataclass
class OperatorRecord:
    name: str
    cert_serial: str
    added: str
    state: State = "active"
    revoked_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "cert_serial": self.cert_serial,
            "state": self.state,
            "added": self.added,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class RevokedCert:
    serial: str
    at: str
    cn: str


@dataclass
class Inventory:
    fleet: str
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    operators: dict[str, OperatorRecord] = field(default_factory=dict)
    revoked_certs: list[RevokedCert] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, fleet: str) -> Inventory:
        if not path.exists():
            return cls(fleet)
        data = read_checked(path, what="inventory", limit=_MAX_INVENTORY, error=ConfigError).data
        try:
            doc = json.loads(data)
            inv = cls(doc["fleet"])
            for did, d in doc["devices"].items():
                inv.devices[did] = DeviceRecord(
                    id=did,
                    groups=tuple(d["groups"]),
                    bundle_key_id=d["bundle_key_id"],
                    signing_key_id=d["signing_key_id"],
                    cert_serial=d["cert_serial"],
                    enrolled=d["enrolled"],
                    added=d["added"],
                    state=d["state"],
                    revoked_at=d.get("revoked_at"),
                    site_cert_serial=d.get("site_cert_serial"),
                )
            for name, o in doc.get("operators", {}).items():
                inv.operators[name] = OperatorRecord(
                    name=name,
                    cert_serial=o["cert_serial"],
                    added=o["added"],
                    state=o["state"],
                    revoked_at=o.get("revoked_at"),
                )
            inv.revoked_certs = [
                RevokedCert(r["serial"], r["at"], r["cn"]) for r in doc.get("revoked_certs", [])
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"inventory {path} is damaged ({type(exc).__name__}: {exc})") from None
        if inv.fleet != fleet:
            raise ConfigError(f"inventory {path} is for fleet {inv.fleet!r}, not {fleet!r}")
        return inv

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "fleet": self.fleet,
            "devices": {k: v.to_json() for k, v in sorted(self.devices.items())},
            "operators": {k: v.to_json() for k, v in sorted(self.operators.items())},
            "revoked_certs": [{"serial": r.serial, "at": r.at, "cn": r.cn} for r in self.revoked_certs],
        }

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=1).encode() + b"\n", mode=0o600)

    def revoke_cert(self, serial: str, cn: str, at: datetime) -> None:
        if all(r.serial != serial for r in self.revoked_certs):
            self.revoked_certs.append(RevokedCert(serial, at.isoformat(timespec="seconds"), cn))

    def select(self, targets: list[str]) -> list[DeviceRecord]:
        """The active devices named by ``targets`` ("all", group names, device ids), in id order. A name that
        matches nothing, or names a revoked device, is an error: sealing for fewer devices than meant would
        be found out only on the devices."""
        chosen: dict[str, DeviceRecord] = {}
        for t in targets:
            if t == "all":
                hits = [d for d in self.devices.values() if d.state == "active"]
            elif t in self.devices:
                if self.devices[t].state != "active":
                    raise ConfigError(f"device {t} is revoked: it cannot be a recipient")
                hits = [self.devices[t]]
            else:
                hits = [d for d in self.devices.values() if t in d.groups and d.state == "active"]
                if not hits and not any(t in d.groups for d in self.devices.values()):
                    raise ConfigError(f"--to {t!r}: no device and no group of that name in the inventory")
            for d in hits:
                chosen[d.id] = d
        if not chosen:
            raise ConfigError(f"--to {' '.join(targets)}: no active device matches")
        return [chosen[k] for k in sorted(chosen)]
