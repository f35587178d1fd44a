"""The wire format of a sealed bundle delivered over MQTT in chunks (docs/fleet.md, "Deploy"), and the one
place the device reads it.

Topics, under the fleet prefix ``P = edgeguard/v1/<fleet>``: retained QoS 1 messages
``P/bundles/<sha256>/<i>`` (i = 0..n-1, decimal) holding the bytes of the sealed ``.egm`` (already
encrypted for its recipients), and a retained manifest ``P/bundles/<sha256>/meta`` =
``{"v":1,"sha256":hex,"size":int,"chunk_size":int,"chunks":int}``. Removing a bundle is publishing
empty retained payloads on the same topics.

The device's gatekeeper (:class:`ChunkGate`) checks, in this order and before anything proportional to a
claim is allocated:

1. meta: strict JSON, exactly the five keys, ``v == 1``, ``sha256`` and ``size`` equal to what the signed
   ``deploy`` command named (the command is authenticated, the meta is not), ``chunk_size`` within bounds,
   ``chunks == ceil(size / chunk_size)``;
2. each chunk: a decimal index below ``chunks`` (no leading zeros), and exactly ``chunk_size`` bytes (the last
   one: the remainder). Nothing is buffered beyond the one payload paho already holds.

Chunks are not individually authenticated: the SHA-256 of the whole file, compared with the signed command's
digest once every chunk is on disk, decides; then the bundle itself is verified like any bundle.

The writer side (:func:`publish_bundle`, :func:`bundle_messages`) is imported by the operator tools.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "BundleMeta",
    "ChunkGate",
    "ChunkRefused",
    "bundle_topic",
    "bundle_messages",
    "publish_bundle",
    "removal_messages",
]

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
MIN_CHUNK_SIZE: Final = 1024
MAX_CHUNK_SIZE: Final = 1024 * 1024  # under the fleet broker's max_packet_size with the topic and header
_META_MAX = 512  # the meta document is ~130 bytes
_SHA = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


class ChunkRefused(ValueError):
    """A meta document or chunk that does not fit the signed command or the format: dropped, one line."""


@dataclass(frozen=True)
class BundleMeta:
    sha256: str
    size: int
    chunk_size: int
    chunks: int

    def expected_len(self, index: int) -> int:
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)

    def to_json(self) -> bytes:
        doc = {"v": 1, "sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size,
               "chunks": self.chunks}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def for_bundle(cls, sha256: str, size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BundleMeta:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if size < 1:
            raise ValueError("an empty bundle cannot be delivered")
        return cls(sha256=sha256, size=size, chunk_size=chunk_size, chunks=math.ceil(size / chunk_size))


def bundle_topic(prefix: str, sha256: str, part: str) -> str:
    """``prefix`` is the fleet prefix ``edgeguard/v1/<fleet>`` (no trailing slash)."""
    return f"{prefix}/bundles/{sha256}/{part}"


def _parse_unverified_meta(raw: bytes, *, sha256: str, size: int) -> BundleMeta:
    if len(raw) > _META_MAX:
        raise ChunkRefused(f"bundle meta of {len(raw)} bytes (at most {_META_MAX})")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ChunkRefused("bundle meta is not JSON") from None
    keys = {"v", "sha256", "size", "chunk_size", "chunks"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise ChunkRefused(f"bundle meta must have exactly the keys {sorted(keys)}")
    if doc["v"] != 1 or type(doc["v"]) is not int:
        raise ChunkRefused(f"bundle meta version {str(doc['v'])[:20]!r} is not 1")
    if doc["sha256"] != sha256:
        raise ChunkRefused("bundle meta names another digest than the deploy command")
    for key in ("size", "chunk_size", "chunks"):
        if type(doc[key]) is not int:
            raise ChunkRefused(f"bundle meta {key} is not an integer")
    if doc["size"] != size:
        raise ChunkRefused(f"bundle meta size {doc['size']} is not the deploy command's {size}")
    chunk_size = doc["chunk_size"]
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkRefused(f"bundle meta chunk_size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if doc["chunks"] != math.ceil(size / chunk_size):
        raise ChunkRefused(f"bundle meta chunks {doc['chunks']} does not fit size and chunk_size")
    return BundleMeta(sha256=sha256, size=size, chunk_size=chunk_size, chunks=doc["chunks"])


class ChunkGate:
    """Checks the messages of one bundle against the signed command's digest and size (see the module)."""

    def __init__(self, *, sha256: str, size: int) -> None:
        if not _SHA.fullmatch(sha256) or size < 1:
            raise ValueError("sha256 must be 64 lowercase hex digits and size positive")
        self.sha256 = sha256
        self.size = size
        self.meta: BundleMeta | None = None

    def accept_meta(self, raw: bytes) -> BundleMeta:
        meta = _parse_unverified_meta(raw, sha256=self.sha256, size=self.size)
        if self.meta is not None and meta != self.meta:
            raise ChunkRefused("bundle meta changed during the transfer")
        self.meta = meta
        return meta

    def check_chunk(self, part: str, payload_len: int) -> int:
        """The chunk's index; ``ChunkRefused`` before anything is written when it does not fit the meta."""
        meta = self.meta
        if meta is None:
            raise ChunkRefused("chunk before the bundle meta")
        if not _INDEX.fullmatch(part):
            raise ChunkRefused(f"chunk index {part[:20]!r} is not a decimal number")
        index = int(part)
        if index >= meta.chunks:
            raise ChunkRefused(f"chunk index {index} beyond the {meta.chunks} chunks of the meta")
        want = meta.expected_len(index)
        if payload_len != want:
            raise ChunkRefused(f"chunk {index} has {payload_len} bytes, the meta says {want}")
        return index


def bundle_messages(
    prefix: str, data: bytes, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every chunk, then the meta (published last: a device that sees the meta finds
    the chunks retained already)."""
    meta = BundleMeta.for_bundle(sha256, len(data), chunk_size)
    view = memoryview(data)
    for i in range(meta.chunks):
        yield bundle_topic(prefix, sha256, str(i)), bytes(view[i * chunk_size:(i + 1) * chunk_size])
    yield bundle_topic(prefix, sha256, "meta"), meta.to_json()


def removal_messages(prefix: str, sha256: str, chunks: int) -> Iterator[tuple[str, bytes]]:
    """Empty retained payloads that delete a published bundle from the broker."""
    yield bundle_topic(prefix, sha256, "meta"), b""
    for i in range(chunks):
        yield bundle_topic(prefix, sha256, str(i)), b""


class _Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Any: ...


def publish_bundle(
    client: _Publisher,
    prefix: str,
    data: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout_s: float = 120.0,
) -> BundleMeta:
    """Publish a sealed bundle's chunks and meta, retained at QoS 1, on a connected paho client; waits for
    every PUBACK (``timeout_s`` each). Returns the meta. ``prefix``: ``edgeguard/v1/<fleet>``."""
    import hashlib  # noqa: PLC0415 - the writer side only

    sha = hashlib.sha256(data).hexdigest()
    messages = bundle_messages(prefix, data, sha, chunk_size)
    infos = [client.publish(t, p, qos=1, retain=True) for t, p in messages]
    for info in infos:
        if hasattr(info, "wait_for_publish"):
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise TimeoutError(f"bundle chunk not acknowledged by the broker within {timeout_s} s")
    return BundleMeta.for_bundle(sha, len(data), chunk_size)
