"""``fleet add-devices``: the devices CSV (``id,groups``), checked row by row with the line in each error."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

from ._fleetdir import ID_RE

__all__ = ["read_devices_csv"]

_MAX_CSV_BYTES = 16 * 1024 * 1024


def read_devices_csv(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``id,groups`` rows (header optional; groups separated by ';' or spaces); '#' lines are comments."""
    data = read_checked(path, what="devices CSV", limit=_MAX_CSV_BYTES, error=ConfigError).data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    rows: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    first = True
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        device_id = row[0].strip()
        header, first = first and device_id.lower() == "id", False
        if header:  # the first row that is not a comment may be the header
            continue
        if not ID_RE.fullmatch(device_id):
            raise ConfigError(f"{path}:{n}: device id {device_id[:80]!r}: 1..64 of A-Z a-z 0-9 _ . -")
        if device_id in seen:
            raise ConfigError(f"{path}:{n}: device {device_id} listed twice")
        seen.add(device_id)
        groups = tuple(g for cell in row[1:] for g in re.split(r"[;\s]+", cell.strip()) if g)
        for g in groups:
            if not ID_RE.fullmatch(g) or g == "all":
                raise ConfigError(f"{path}:{n}: group {g[:80]!r}: 1..64 of A-Z a-z 0-9 _ . - (not 'all')")
        rows.append((device_id, groups))
    return rows
