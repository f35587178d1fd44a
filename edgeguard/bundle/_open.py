"""The ONLY code that reads bundle bytes: untrusted bytes in, a verified manifest and plaintext model out.

Checks run in a fixed order, each one before anything that depends on it (docs/bundle.md, "Verification"):

1. header: magic, version, and every claimed length against ``BundleLimits`` (nothing proportional to a claim
   is allocated before this);
2. signer: the header's key id is not revoked and is in the trust store;
3. signature: Ed25519 over header || manifest; the header carries SHA-256(body), so this covers every byte;
4. manifest: strict JSON schema, lengths consistent with the file, sizes within limits;
5. expiry, then the rollback floor for the model name;
6. recipient: this device's key id is listed;
7. body digest: SHA-256 of everything after the signature equals the signed one (before any decryption);
8. unwrap the content key (HPKE, info bound to this manifest), decrypt every chunk straight into one
   preallocated buffer (GCM; nonce and AAD bind stream, index and final flag), then compare the plaintext's
   SHA-256 with the manifest. Only then is the buffer handed out and the rollback floor raised.

Every failure is ``BundleRejected(check, detail)``. Functions reading data that is not yet authenticated are
named ``_parse_unverified_*``; they are written to be safe on arbitrary bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from edgeguard.bundle import _format as fmt
from edgeguard.bundle._golden import decode_golden
from edgeguard.bundle._manifest_schema import parse_unverified_manifest_json, parse_utc
from edgeguard.bundle._rollback import RollbackFloor
from edgeguard.bundle.manifest import GoldenSample, Manifest
from edgeguard.errors import BundleRejected
from edgeguard.keys import DeviceKey, TrustStore

__all__ = ["OpenedBundle", "VerifiedBundle", "open_bundle", "verify_bundle", "inspect_bundle"]

_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class _Header:
    manifest_len: int
    body_len: int
    signer_key_id: str
    body_sha256: bytes


class _Source:
    """Bundle bytes in memory (zero-copy views) or in a file (read into a reusable scratch buffer, so opening a
    file never holds the whole ciphertext in memory)."""

    def __init__(self, source: Path | bytes | bytearray | memoryview) -> None:
        self._file: BinaryIO | None = None
        self._mem: memoryview | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._mem = memoryview(source).cast("B")
            self.size = self._mem.nbytes
        else:
            try:
                self._file = open(source, "rb")  # noqa: SIM115 - closed in close()
                self.size = os.fstat(self._file.fileno()).st_size
            except OSError as exc:
                raise BundleRejected("malformed", f"cannot read {source}: {exc.strerror or exc}") from None

    def view(self, offset: int, n: int, scratch: bytearray | None = None) -> memoryview:
        if self._mem is not None:
            return self._mem[offset : offset + n]
        assert self._file is not None
        buf = memoryview(scratch if scratch is not None else bytearray(n))[:n]
        self._file.seek(offset)
        got = self._file.readinto(buf)
        if got != n:  # the file shrank under us: treat like truncation
            raise BundleRejected("integrity", "bundle file changed while it was being read")
        return buf

    def blocks(self, offset: int, n: int, scratch: bytearray) -> Iterator[memoryview]:
        while n > 0:
            step = min(n, len(scratch))
            yield self.view(offset, step, scratch)
            offset += step
            n -= step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._mem is not None:
            self._mem.release()


def _parse_unverified_header(raw: bytes | memoryview, total_size: int, limits: fmt.BundleLimits) -> _Header:
    if total_size < fmt.HEADER_SIZE:
        raise BundleRejected("malformed", f"{total_size} bytes is too short for a bundle")
    magic, version, flags, manifest_len, body_len, kid, body_sha = fmt.HEADER.unpack(raw)
    if magic != fmt.MAGIC:
        raise BundleRejected("malformed", "not an EdgeGuard bundle (bad magic)")
    if version != fmt.FORMAT_VERSION:
        raise BundleRejected("unsupported", f"bundle format version {version} (this runtime reads 1)")
    if flags != 0:
        raise BundleRejected("unsupported", f"unknown header flags {flags:#06x}")
    if manifest_len > limits.max_manifest_bytes:
        raise BundleRejected(
            "too large", f"manifest of {manifest_len} bytes exceeds the {limits.max_manifest_bytes} limit"
        )
    if manifest_len == 0:
        raise BundleRejected("malformed", "empty manifest")
    if body_len > limits.max_body_bytes():
        raise BundleRejected("too large", f"body of {body_len} bytes exceeds the {limits.max_body_bytes()} limit")
    if total_size < fmt.HEADER_SIZE + manifest_len + fmt.SIGNATURE_SIZE:
        raise BundleRejected("malformed", "bundle is shorter than its header, manifest and signature")
    return _Header(manifest_len, body_len, bytes(kid).hex(), bytes(body_sha))


def _check_layout(header: _Header, m: Manifest, total_size: int, limits: fmt.BundleLimits) -> None:
    """The signed manifest's sizes must fit the limits and describe the signed body exactly."""
    if m.payload_size > limits.max_model_bytes:
        raise BundleRejected("too large", f"model of {m.payload_size} bytes exceeds {limits.max_model_bytes}")
    if m.golden_size > limits.max_golden_bytes:
        raise BundleRejected("too large", f"golden vectors of {m.golden_size} bytes exceed the limit")
    if len(m.recipient_key_ids) > limits.max_recipients:
        raise BundleRejected("too large", f"{len(m.recipient_key_ids)} recipients exceed {limits.max_recipients}")
    if m.chunk_size > limits.max_chunk_size:
        raise BundleRejected("too large", f"chunk size {m.chunk_size} exceeds {limits.max_chunk_size}")
    if m.chunk_size < limits.min_chunk_size:
        raise BundleRejected("malformed", f"chunk size {m.chunk_size} is below {limits.min_chunk_size}")
    if m.publisher_key_id != header.signer_key_id:
        raise BundleRejected("malformed", "manifest names a different publisher key than the header")
    expected = (
        len(m.recipient_key_ids) * fmt.WRAPPED_KEY_SIZE
        + fmt.stream_size(m.golden_size, m.chunk_size)
        + fmt.stream_size(m.payload_size, m.chunk_size)
    )
    if header.body_len != expected:
        raise BundleRejected("malformed", f"body length {header.body_len} does not match the manifest ({expected})")
    if total_size != fmt.HEADER_SIZE + header.manifest_len + fmt.SIGNATURE_SIZE + header.body_len:
        raise BundleRejected("integrity", "bundle is truncated or has trailing bytes")


def _runtime_version() -> tuple[int, ...]:
    from edgeguard import __version__

    return tuple(int(p) for p in __version__.split(".")[:3] if p.isdigit())


@dataclass(frozen=True)
class VerifiedBundle:
    """Header, manifest and signature checked; body digest checked when ``body_checked``. Nothing decrypted."""

    manifest: Manifest
    manifest_bytes: bytes
    signed_by: str


def _verify(
    src: _Source,
    *,
    trust: TrustStore,
    state_dir: Path | None,
    now: datetime | None,
    limits: fmt.BundleLimits,
    device_key_id: str | None,
    scratch: bytearray,
) -> tuple[_Header, VerifiedBundle]:
    head = src.view(0, min(src.size, fmt.HEADER_SIZE))  # 64 bytes at most
    header = _parse_unverified_header(bytes(head), src.size, limits)
    # Steps 2-3: trust, then the signature over header || manifest (bounded by the limit checked above).
    key = trust.signer(header.signer_key_id)
    signed = bytes(src.view(0, fmt.HEADER_SIZE + header.manifest_len))
    signature = bytes(src.view(fmt.HEADER_SIZE + header.manifest_len, fmt.SIGNATURE_SIZE))
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        raise BundleRejected("signature", f"signature by {header.signer_key_id} does not verify") from None
    manifest_bytes = signed[fmt.HEADER_SIZE :]
    # Step 4: from here on the manifest is the publisher's statement; still validated strictly.
    manifest = parse_unverified_manifest_json(manifest_bytes, limits)
    _check_layout(header, manifest, src.size, limits)
    if manifest.min_runtime_tuple() > _runtime_version():
        raise BundleRejected("unsupported", f"bundle needs EdgeGuard >= {manifest.min_runtime}")
    # Step 5: expiry, then rollback.
    now = now or datetime.now(timezone.utc)
    if manifest.not_after is not None and now > parse_utc(manifest.not_after):
        raise BundleRejected("expired", f"{manifest.name} v{manifest.version} expired at {manifest.not_after}")
    if state_dir is not None:
        floor = RollbackFloor(state_dir).get(manifest.name)
        if manifest.version < floor:
            raise BundleRejected(
                "rollback", f"{manifest.name} v{manifest.version} is below this device's floor v{floor}"
            )
    # Step 6: recipient (cheap) before the body digest (one pass over the file).
    if device_key_id is not None and device_key_id not in manifest.recipient_key_ids:
        raise BundleRejected("not a recipient", f"bundle is not sealed for device key {device_key_id}")
    # Step 7: SHA-256 of the body against the signed header, before any decryption.
    h = hashlib.sha256()
    for block in src.blocks(fmt.HEADER_SIZE + header.manifest_len + fmt.SIGNATURE_SIZE, header.body_len, scratch):
        h.update(block)
    if not hmac.compare_digest(h.digest(), header.body_sha256):
        raise BundleRejected("integrity", "bundle body does not match its signed digest")
    return header, VerifiedBundle(manifest, manifest_bytes, header.signer_key_id)


def _decrypt_stream(
    src: _Source,
    offset: int,
    plain_size: int,
    *,
    chunk_size: int,
    key: bytes,
    binding: bytes,
    stream: int,
    out: memoryview,
    scratch: bytearray,
) -> int:
    """Decrypt one chunked stream into ``out``; return the offset after it. The caller wipes ``out`` on error."""
    count = fmt.chunk_count(plain_size, chunk_size)
    for index in range(count):
        final = index == count - 1
        start = index * chunk_size
        n = min(chunk_size, plain_size - start)
        ct = src.view(offset, n + fmt.TAG_SIZE, scratch)
        decryptor = Cipher(
            algorithms.AES(key), modes.GCM(fmt.chunk_nonce(stream, index, final), bytes(ct[n:]))
        ).decryptor()
        decryptor.authenticate_additional_data(fmt.chunk_aad(binding, stream, index, final))
        # update_into writes straight into the final buffer (no per-chunk copy); finalize() checks the tag
        # before the caller may look at the buffer.
        decryptor.update_into(ct[:n], out[start : start + n])
        try:
            decryptor.finalize()
        except InvalidTag:
            raise BundleRejected("integrity", f"chunk {index} of stream {stream} failed authentication") from None
        offset += n + fmt.TAG_SIZE
    return offset


class OpenedBundle:
    """A fully verified bundle: the manifest, the plaintext model (memory only) and the golden vectors.

    Hand ``model`` to a backend (``InferenceSession(bytes(model))`` / ``Interpreter(model_content=...)``), then
    call ``wipe()``. Wiping zeroes this buffer only: copies a backend or Python made cannot be reached, so it
    is best effort (docs/bundle.md, "Caveats").
    """

    def __init__(
        self, manifest: Manifest, model: bytearray, golden: tuple[GoldenSample, ...], state_dir: Path | None
    ) -> None:
        self.manifest = manifest
        self.model = model
        self.golden = golden
        self._state_dir = state_dir

    def wipe(self) -> None:
        """Overwrite the plaintext with zeros (best effort; see the class docstring)."""
        if self.model:
            memoryview(self.model)[:] = bytes(len(self.model))

    def commit_rollback_floor(self) -> bool:
        """Raise this model name's rollback floor to this version; True when it moved. Idempotent."""
        if self._state_dir is None:
            return False
        return RollbackFloor(self._state_dir).raise_to(self.manifest.name, self.manifest.version)


def _scratch_for(src: _Source, chunk_size: int) -> bytearray:
    # Files are read through one reusable buffer; in-memory sources need none (zero-copy views).
    return bytearray(max(chunk_size + fmt.TAG_SIZE, _HASH_BLOCK) if src.size else 0)


def verify_bundle(
    source: Path | bytes,
    *,
    trust: TrustStore,
    state_dir: Path | None = None,
    now: datetime | None = None,
    limits: fmt.BundleLimits | None = None,
    device_key: DeviceKey | None = None,
) -> VerifiedBundle:
    """Steps 1-7 (everything but decryption). Never writes the rollback floor."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        scratch = bytearray(_HASH_BLOCK) if isinstance(source, Path) else bytearray(_HASH_BLOCK)
        _, verified = _verify(
            src, trust=trust, state_dir=state_dir, now=now, limits=limits,
            device_key_id=device_key.key_id if device_key else None, scratch=scratch,
        )
        return verified
    finally:
        src.close()


def open_bundle(
    source: Path | bytes,
    *,
    trust: TrustStore,
    device_key: DeviceKey,
    state_dir: Path | None,
    now: datetime | None = None,
    limits: fmt.BundleLimits | None = None,
    commit_floor: bool = True,
) -> OpenedBundle:
    """Verify, unwrap and decrypt a bundle into memory. With ``state_dir`` and ``commit_floor`` the rollback
    floor is raised to this version after every check has passed, just before returning."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        in_memory = not isinstance(source, Path)
        scratch = bytearray(_HASH_BLOCK if not in_memory else 0) or bytearray(_HASH_BLOCK)
        header, v = _verify(
            src, trust=trust, state_dir=state_dir, now=now, limits=limits,
            device_key_id=device_key.key_id, scratch=scratch,
        )
        m = v.manifest
        if not in_memory and len(scratch) < m.chunk_size + fmt.TAG_SIZE:
            scratch = bytearray(m.chunk_size + fmt.TAG_SIZE)  # bounded by limits.max_chunk_size
        offset = fmt.HEADER_SIZE + header.manifest_len + fmt.SIGNATURE_SIZE
        slot = m.recipient_key_ids.index(device_key.key_id)
        wrapped = bytes(src.view(offset + slot * fmt.WRAPPED_KEY_SIZE, fmt.WRAPPED_KEY_SIZE))
        try:
            content_key = _HPKE.decrypt(wrapped, device_key.private_key, info=fmt.hpke_info(v.manifest_bytes))
        except (InvalidTag, ValueError):
            raise BundleRejected("integrity", "content key does not unwrap with this device key") from None
        if len(content_key) != fmt.CONTENT_KEY_SIZE:
            raise BundleRejected("malformed", "content key has the wrong length")
        offset += len(m.recipient_key_ids) * fmt.WRAPPED_KEY_SIZE
        binding = fmt.manifest_binding(v.manifest_bytes)
        golden_buf = bytearray(m.golden_size)
        model = bytearray(m.payload_size)  # the one plaintext buffer, sized by the signed, bounded manifest
        try:
            common = {"chunk_size": m.chunk_size, "key": content_key, "binding": binding, "scratch": scratch}
            offset = _decrypt_stream(
                src, offset, m.golden_size, stream=fmt.STREAM_GOLDEN, out=memoryview(golden_buf), **common
            )
            _decrypt_stream(src, offset, m.payload_size, stream=fmt.STREAM_MODEL, out=memoryview(model), **common)
            if not hmac.compare_digest(hashlib.sha256(model).hexdigest(), m.payload_sha256):
                raise BundleRejected("integrity", "decrypted model does not match the manifest's SHA-256")
            golden = decode_golden(golden_buf, m, limits) if m.golden_size else ()
        except BaseException:
            memoryview(model)[:] = bytes(len(model))
            raise
        finally:
            memoryview(scratch)[:] = bytes(len(scratch))
        opened = OpenedBundle(m, model, golden, state_dir)
        if commit_floor:
            opened.commit_rollback_floor()
        return opened
    finally:
        src.close()


def inspect_bundle(source: Path | bytes, *, limits: fmt.BundleLimits | None = None) -> dict[str, object]:
    """Header and manifest as JSON-able data, WITHOUT checking the signature (say so to the user)."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        header = _parse_unverified_header(bytes(src.view(0, min(src.size, fmt.HEADER_SIZE))), src.size, limits)
        manifest = parse_unverified_manifest_json(
            bytes(src.view(fmt.HEADER_SIZE, header.manifest_len)), limits
        )
        return {
            "signature_checked": False,
            "signer_key_id": header.signer_key_id,
            "bundle_bytes": src.size,
            "manifest": manifest.to_json(),
        }
    finally:
        src.close()
