"""The byte layout of a sealed bundle (``.egm``), shared by the packer and the single parser (``_open``).

Nothing here reads untrusted bytes: it only defines constants, the limits and how nonces/AAD are built.
The full description, with the reasons behind each choice, is in ``docs/bundle.md``.

Layout (all integers big-endian)::

    header     64 bytes   magic(8) version(u16) flags(u16) manifest_len(u32) body_len(u64)
                          signer_key_id(8) body_sha256(32)
    manifest   manifest_len bytes of UTF-8 JSON
    signature  64 bytes   Ed25519 over header || manifest (the header carries the SHA-256 of the body,
                          so the signature covers every byte of the file except itself)
    body       body_len bytes:
                 wrapped keys   recipients x 80 bytes, HPKE(enc 32 || AES-256-GCM(content key) 48), in the
                                manifest's recipient order
                 golden stream  chunks of the golden-vector .npz (may be empty)
                 model stream   chunks of the model
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["BundleLimits"]

MAGIC: Final = b"\x89EGM\r\n\x1a\n"  # PNG-style: a non-ASCII byte and CR/LF/EOF catch text-mode mangling
FORMAT_VERSION: Final = 1
HEADER = struct.Struct(">8sHHIQ8s32s")
HEADER_SIZE: Final = HEADER.size  # 64
SIGNATURE_SIZE: Final = 64
KEY_ID_BYTES: Final = 8  # key ids are the first 8 bytes (16 hex) of SHA-256(raw public key)
CONTENT_KEY_SIZE: Final = 32
WRAPPED_KEY_SIZE: Final = 80  # X25519 enc (32) + AES-256-GCM of a 32-byte key (32 + 16 tag)
TAG_SIZE: Final = 16
DEFAULT_CHUNK_SIZE: Final = 1 << 20

STREAM_GOLDEN: Final = 1
STREAM_MODEL: Final = 2

# Domain-separation labels: a value computed for one purpose can never be accepted for another.
HPKE_INFO_LABEL: Final = b"edgeguard/egm/v1 content key\x00"
AAD_LABEL: Final = b"edgeguard/egm/v1 chunk\x00"


@dataclass(frozen=True, kw_only=True)
class BundleLimits:
    """Hard bounds on what a bundle may claim, checked before anything proportional to a claim is allocated.

    The defaults suit edge boards (a 512 MiB model is already more than a Raspberry Pi can run).
    """

    max_manifest_bytes: int = 256 * 1024
    max_recipients: int = 1024
    max_model_bytes: int = 512 * 1024 * 1024
    max_golden_bytes: int = 32 * 1024 * 1024
    min_chunk_size: int = 1024
    max_chunk_size: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_manifest_bytes", "max_recipients", "max_model_bytes", "max_golden_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"BundleLimits.{name} must be >= 1")
        if not 16 <= self.min_chunk_size <= self.max_chunk_size <= 1 << 30:
            raise ValueError("BundleLimits needs 16 <= min_chunk_size <= max_chunk_size <= 1 GiB")
        if self.max_manifest_bytes > 16 * 1024 * 1024:
            raise ValueError("BundleLimits.max_manifest_bytes must be <= 16 MiB")

    def max_body_bytes(self) -> int:
        """The largest body any bundle within these limits can have (worst case: smallest chunks)."""
        return (
            self.max_recipients * WRAPPED_KEY_SIZE
            + stream_size(self.max_golden_bytes, self.min_chunk_size)
            + stream_size(self.max_model_bytes, self.min_chunk_size)
        )


def chunk_count(plain_size: int, chunk_size: int) -> int:
    return -(-plain_size // chunk_size)


def stream_size(plain_size: int, chunk_size: int) -> int:
    """Bytes a stream of ``plain_size`` plaintext bytes takes on the wire (one tag per chunk)."""
    return plain_size + chunk_count(plain_size, chunk_size) * TAG_SIZE


def hpke_info(manifest_bytes: bytes) -> bytes:
    """HPKE ``info`` (RFC 9180 section 5.1): binds a wrapped key to exactly this bundle's signed manifest."""
    return HPKE_INFO_LABEL + hashlib.sha256(manifest_bytes).digest()


def manifest_binding(manifest_bytes: bytes) -> bytes:
    return hashlib.sha256(manifest_bytes).digest()


def chunk_nonce(stream: int, index: int, final: bool) -> bytes:
    """96-bit GCM nonce: stream id, final flag, chunk index. Unique per (content key, chunk) by construction;
    a chunk moved to another position, stream or to the end decrypts under another nonce (tag fails)."""
    return struct.pack(">BBHQ", stream, 1 if final else 0, 0, index)


def chunk_aad(binding: bytes, stream: int, index: int, final: bool) -> bytes:
    """AAD repeats the position and binds the chunk to this bundle's manifest (no splicing across bundles,
    even ones that a bug made share a content key)."""
    return AAD_LABEL + binding + struct.pack(">BBQ", stream, 1 if final else 0, index)
