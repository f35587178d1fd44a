"""The byte layout of a sealed bundle (``.egm``), shared by the packer and the single parser (``_open``).

Nothing here reads untrusted bytes: it only defines constants, the limits, the arithmetic of the layout and
how nonces/AAD are built. The full description, with the reasons behind each choice, is in ``docs/bundle.md``.

Layout (all integers big-endian)::

    header     64 bytes   magic(8) version(u16) flags(u16) manifest_len(u32) body_len(u64)
                          signer_key_id(8) index_digest(32)
    manifest   manifest_len bytes of UTF-8 JSON (its ``suite`` field names the cipher suite; absent: the
                          default, AES-256-GCM + SHA-256, as in every bundle before suites existed)
    signature  64 bytes   Ed25519 over header || manifest
    body       body_len bytes:
                 index          wrapped keys: recipients x 80 bytes, HPKE(enc 32 || AES-256-GCM(key) 48)
                                chunk table: 32 bytes per chunk, the suite's digest (SHA-256 or BLAKE2b-256)
                                of chunk ciphertext || tag, golden chunks then model chunks, in stream order
                                (the header's index_digest is the suite's digest of these two parts together)
                 golden stream  chunks of the golden-vector .npz (may be empty)
                 model stream   chunks of the model

The signature covers the header and the manifest, so it covers the suite and the digest of the index, which
covers every wrapped key and the digest of every chunk at its position: every byte except the signature.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = ["BundleLimits", "SUITES", "DEFAULT_SUITE", "Suite"]

MAGIC: Final = b"\x89EGM\r\n\x1a\n"  # PNG-style: a non-ASCII byte and CR/LF/EOF catch text-mode mangling
FORMAT_VERSION: Final = 2  # 2: per-chunk digest table (one streaming pass); 1 hashed the whole body
HEADER = struct.Struct(">8sHHIQ8s32s")
HEADER_SIZE: Final = HEADER.size  # 64
SIGNATURE_SIZE: Final = 64
KEY_ID_BYTES: Final = 8  # key ids are the first 8 bytes (16 hex) of SHA-256(raw public key)
CONTENT_KEY_SIZE: Final = 32
WRAPPED_KEY_SIZE: Final = 80  # X25519 enc (32) + AES-256-GCM of a 32-byte key (32 + 16 tag)
TAG_SIZE: Final = 16
DIGEST_SIZE: Final = 32  # one digest per chunk in the chunk table (SHA-256, or BLAKE2b with 32-byte output)
# 512 KiB measured fastest for opening a 12 MB model from a file with 2 threads while the per-thread scratch
# buffers stay within a tenth of the model (tools/bench_bundle.py, docs/bundle.md "Performance").
DEFAULT_CHUNK_SIZE: Final = 512 * 1024



@dataclass(frozen=True)
class Suite:
    """A cipher suite: the AEAD that seals the chunks and the collision-resistant digest the signed index
    uses for each chunk and for itself. The HPKE key wrap, the key commitment and the manifest binding stay
    SHA-256/AES-GCM in every suite: they process a few hundred bytes (docs/bundle.md, "Cipher suites")."""

    name: str
    aead: Literal["aes256gcm", "chacha20poly1305"]
    digest: Callable[[bytes | bytearray | memoryview], bytes]


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _blake2b_256(data: bytes | bytearray | memoryview) -> bytes:
    # BLAKE2b parameterised to 32 bytes (not a truncation): its own function, fast in plain 64-bit code.
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def _blake3_256(data: bytes | bytearray | memoryview) -> bytes:
    # Imported here: only a process that opens or packs such a bundle loads it (lean supervisor, fast CLI).
    from blake3 import blake3  # noqa: PLC0415

    return bytes(blake3(data).digest())


# AES-256-GCM + SHA-256 where the CPU has AES and SHA instructions (x86-64, Pi 5, Jetson Orin); ChaCha20-
# Poly1305 + BLAKE2b where it has neither (Pi 4, Pi Zero 2 W): both run at speed in plain integer/NEON code.
# AES-256-GCM + BLAKE3 for the fastest open where GCM is fast: SHA-256 (~1 GB/s even with SHA-NI) bounds the
# default suite far below what VAES-GCM reaches; BLAKE3's SIMD tree runs at several GB/s. Why the GCM tags
# themselves cannot replace the digests: docs/bundle.md, "Cipher suites".
SUITES: Final[dict[str, Suite]] = {
    s.name: s
    for s in (
        Suite("aes256gcm-sha256", "aes256gcm", _sha256),
        Suite("chacha20poly1305-blake2b", "chacha20poly1305", _blake2b_256),
        Suite("aes256gcm-blake3", "aes256gcm", _blake3_256),
    )
}
DEFAULT_SUITE: Final = "aes256gcm-sha256"  # also what a manifest without a ``suite`` field means

STREAM_GOLDEN: Final = 1
STREAM_MODEL: Final = 2

# Domain-separation labels: a value computed for one purpose can never be accepted for another.
HPKE_INFO_LABEL: Final = b"edgeguard/egm/v2 content key\x00"
AAD_LABEL: Final = b"edgeguard/egm/v2 chunk\x00"
KEY_COMMITMENT_LABEL: Final = b"edgeguard/egm/v2 key commitment\x00"


@dataclass(frozen=True, kw_only=True)
class BundleLimits:
    """Hard bounds on what a bundle may claim, checked before anything proportional to a claim is allocated,
    and on what opening one may use (threads).

    The defaults suit edge boards (a 512 MiB model is already more than a Raspberry Pi can run).
    """

    max_manifest_bytes: int = 256 * 1024
    max_recipients: int = 1024
    max_model_bytes: int = 512 * 1024 * 1024
    max_golden_bytes: int = 32 * 1024 * 1024
    min_chunk_size: int = 1024
    max_chunk_size: int = 16 * 1024 * 1024
    # Threads that hash and decrypt chunks at once (hashlib and GCM release the GIL); the number used is
    # also bounded by the CPUs this process may run on. 1 = everything in the calling thread.
    max_open_threads: int = 4

    def __post_init__(self) -> None:
        for name in ("max_manifest_bytes", "max_recipients", "max_model_bytes", "max_golden_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"BundleLimits.{name} must be >= 1")
        if not 16 <= self.min_chunk_size <= self.max_chunk_size <= 1 << 30:
            raise ValueError("BundleLimits needs 16 <= min_chunk_size <= max_chunk_size <= 1 GiB")
        if self.max_manifest_bytes > 16 * 1024 * 1024:
            raise ValueError("BundleLimits.max_manifest_bytes must be <= 16 MiB")
        if not 1 <= self.max_open_threads <= 64:
            raise ValueError("BundleLimits.max_open_threads must be within [1, 64]")

    def max_body_bytes(self) -> int:
        """The largest body any bundle within these limits can have (worst case: smallest chunks)."""
        return Layout(
            recipients=self.max_recipients,
            chunk_size=self.min_chunk_size,
            golden_size=self.max_golden_bytes,
            model_size=self.max_model_bytes,
        ).body_len

    def open_threads(self) -> int:
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(self.max_open_threads, cpus))


def chunk_count(plain_size: int, chunk_size: int) -> int:
    return -(-plain_size // chunk_size)


def stream_size(plain_size: int, chunk_size: int) -> int:
    """Bytes a stream of ``plain_size`` plaintext bytes takes on the wire (one tag per chunk)."""
    return plain_size + chunk_count(plain_size, chunk_size) * TAG_SIZE


@dataclass(frozen=True)
class ChunkRef:
    """Where chunk ``k`` of a bundle lives: its stream, index in that stream, final flag, offset of its
    ciphertext from the start of the body, and the offset and size of its plaintext in its stream."""

    stream: int
    index: int
    final: bool
    body_offset: int
    plain_offset: int
    plain_size: int


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The body layout a (signed) manifest implies: every offset is computed, never read from the file."""

    recipients: int
    chunk_size: int
    golden_size: int
    model_size: int
    # Derived once (``chunk`` runs for every chunk of every open).
    golden_chunks: int = field(init=False)
    chunks: int = field(init=False)
    table_offset: int = field(init=False)
    index_len: int = field(init=False)  # wrapped keys + chunk table: what the header's index_digest covers
    body_len: int = field(init=False)

    def __post_init__(self) -> None:
        def derive(name: str, value: int) -> None:
            object.__setattr__(self, name, value)  # frozen: derived fields are set once, here

        golden_stream = stream_size(self.golden_size, self.chunk_size)
        derive("golden_chunks", chunk_count(self.golden_size, self.chunk_size))
        derive("chunks", self.golden_chunks + chunk_count(self.model_size, self.chunk_size))
        derive("table_offset", self.recipients * WRAPPED_KEY_SIZE)
        derive("index_len", self.table_offset + self.chunks * DIGEST_SIZE)
        derive("body_len", self.index_len + golden_stream + stream_size(self.model_size, self.chunk_size))

    def chunk(self, k: int) -> ChunkRef:
        """Chunk ``k`` of the body, counting golden chunks first (the order of the chunk table)."""
        if k < self.golden_chunks:
            stream, index, size, stream_start = STREAM_GOLDEN, k, self.golden_size, self.index_len
        else:
            stream, index, size = STREAM_MODEL, k - self.golden_chunks, self.model_size
            stream_start = self.index_len + self.golden_size + self.golden_chunks * TAG_SIZE
        plain_offset = index * self.chunk_size
        return ChunkRef(
            stream=stream,
            index=index,
            final=plain_offset + self.chunk_size >= size,
            body_offset=stream_start + index * (self.chunk_size + TAG_SIZE),
            plain_offset=plain_offset,
            plain_size=min(self.chunk_size, size - plain_offset),
        )


def hpke_info(manifest_bytes: bytes) -> bytes:
    """HPKE ``info`` (RFC 9180 section 5.1): binds a wrapped key to exactly this bundle's signed manifest."""
    return HPKE_INFO_LABEL + hashlib.sha256(manifest_bytes).digest()


def manifest_binding(manifest_bytes: bytes) -> bytes:
    return hashlib.sha256(manifest_bytes).digest()


def key_commitment(content_key: bytes) -> str:
    """Signed in the manifest so that every recipient provably unwraps the same content key: GCM is not
    key-committing, so without it a publisher could wrap different keys for different devices and craft
    chunks that authenticate under each, making one signed bundle decrypt to different models. A 256-bit
    random key behind SHA-256 reveals nothing usable."""
    return hashlib.sha256(KEY_COMMITMENT_LABEL + content_key).hexdigest()


def chunk_nonce(stream: int, index: int, final: bool) -> bytes:
    """96-bit AEAD nonce (GCM and ChaCha20-Poly1305 alike): stream id, final flag, chunk index. Unique per
    (content key, chunk) by construction;
    a chunk moved to another position, stream or to the end decrypts under another nonce (tag fails)."""
    return struct.pack(">BBHQ", stream, 1 if final else 0, 0, index)


def chunk_aad(binding: bytes, stream: int, index: int, final: bool) -> bytes:
    """AAD repeats the position and binds the chunk to this bundle's manifest (no splicing across bundles,
    even ones that a bug made share a content key)."""
    return AAD_LABEL + binding + struct.pack(">BBQ", stream, 1 if final else 0, index)
