"""``fleet seal``: one bundle for the fleet's current, non-revoked devices named by ``--to``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from edgeguard.bundle import pack_bundle
from edgeguard.bundle.manifest import ModelFormat
from edgeguard.keys import load_recipient_key

from ._fleetdir import FleetDir
from ._inventory import DeviceRecord, Inventory
from ._issue import Issuer

__all__ = ["seal_for_fleet"]


def seal_for_fleet(
    fd: FleetDir,
    inv: Inventory,
    *,
    model: bytes,
    model_format: ModelFormat,
    name: str,
    version: int,
    targets: list[str],
    golden: Any = (),
    meta: dict[str, Any] | None = None,
    not_after: datetime | None = None,
    chunk_size: int | None = None,
) -> tuple[bytes, list[DeviceRecord]]:
    """The sealed bundle and its recipients. Recipients are read from each device's ``device.pub`` and
    checked against the key id the inventory recorded, so a swapped file in devices/ cannot add a reader."""
    chosen = inv.select(targets)
    recipients = []
    for rec in chosen:
        key = load_recipient_key(fd.device_dir(rec.id) / "device.pub")
        if key.key_id != rec.bundle_key_id:
            from edgeguard.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(
                f"devices/{rec.id}/device.pub has key id {key.key_id}, "
                f"the inventory records {rec.bundle_key_id}"
            )
        recipients.append(key)
    extra: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
    data = pack_bundle(
        model,
        name=name,
        version=version,
        sign_key=Issuer(fd, inv).publisher,
        recipients=recipients,
        model_format=model_format,
        golden=golden,
        meta=meta,
        not_after=not_after,
        **extra,
    )
    return data, chosen
