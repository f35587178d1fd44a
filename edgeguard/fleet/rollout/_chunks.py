"""The bundle chunk format for ``source=mqtt`` deploys, writer side (docs/fleet.md, "Rolling out a model").

A sealed bundle (already encrypted for its recipients, so publishing it is safe) travels as retained QoS 1
messages on ``<prefix>/bundles/<sha256-hex>/<index>`` (index 0..n-1, decimal, each ``chunk_size`` bytes but
the last) plus a retained manifest on ``<prefix>/bundles/<sha256-hex>/meta``::

    {"v":1,"sha256":HEX,"size":INT,"chunk_size":INT,"chunks":INT}

The device's reader (its gatekeeper for these bytes) lives on the device side; this module only lays the
bytes out. Removing a bundle is publishing an empty retained payload on each of those topics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = ["CHUNK_SIZE", "MIN_CHUNK_SIZE", "MAX_CHUNK_SIZE", "ChunkedBundle", "chunk_bundle", "bundle_topics"]

CHUNK_SIZE: Final = 256 * 1024  # fits the fleet broker's max_packet_size (1 MiB) with room to spare
MIN_CHUNK_SIZE: Final = 1024  # the device's reader accepts 1 KiB .. 1 MiB
MAX_CHUNK_SIZE: Final = 1024 * 1024


@dataclass(frozen=True)
class ChunkedBundle:
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    meta: bytes  # the manifest payload, exactly as published

    def topic(self, prefix: str, index: int | str) -> str:
        return f"{prefix}/bundles/{self.sha256}/{index}"


def chunk_bundle(data: bytes, *, chunk_size: int = CHUNK_SIZE) -> tuple[ChunkedBundle, Iterator[bytes]]:
    """The manifest of ``data`` and its chunks in index order (memoryview slices, no copies)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    if not data:
        raise ValueError("an empty bundle cannot be published")
    chunks = -(-len(data) // chunk_size)
    sha = hashlib.sha256(data).hexdigest()
    # The contract's key order, compact: byte-identical to the device side's writer.
    meta = {"v": 1, "sha256": sha, "size": len(data), "chunk_size": chunk_size, "chunks": chunks}
    body = json.dumps(meta, separators=(",", ":")).encode()
    view = memoryview(data)

    def parts() -> Iterator[bytes]:
        for i in range(chunks):
            yield bytes(view[i * chunk_size : (i + 1) * chunk_size])

    return ChunkedBundle(sha, len(data), chunk_size, chunks, body), parts()


def bundle_topics(prefix: str, sha256: str, chunks: int) -> list[str]:
    """Every topic of one published bundle, the manifest first (to remove it: an empty retained payload on
    each, in this order, so that no device finds a manifest whose chunks are gone)."""
    return [f"{prefix}/bundles/{sha256}/meta"] + [f"{prefix}/bundles/{sha256}/{i}" for i in range(chunks)]
