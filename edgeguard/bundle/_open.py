"""The ONLY code that reads bundle bytes: untrusted bytes in, a verified manifest and plaintext model out.

Checks run in a fixed order, each one before anything that depends on it (docs/bundle.md, "Verification"):

1. header: magic, version, and every claimed length against ``BundleLimits`` (nothing proportional to a claim
   is allocated before this);
2. signer: the header's key id is not revoked and is in the trust store;
3. signature: Ed25519 over header || manifest; the header carries SHA-256 of the index (wrapped keys and the
   table of per-chunk ciphertext digests), so this covers every byte;
4. manifest: strict JSON schema, lengths consistent with the file, sizes within limits;
5. expiry, then the model name (``model.name`` or the pinned slot) and the rollback floor for it;
6. recipient: this device's key id is listed;
7. index: read once, its SHA-256 equals the signed one;
8. unwrap the content key (HPKE, info bound to this manifest) and check it against the signed key commitment;
   then ONE pass over the chunks: each is read once into a private buffer, its SHA-256 compared with the
   table, and only then that same buffer is decrypted (GCM; nonce and AAD bind stream, index and final flag)
   straight into one preallocated plaintext buffer. Only then is the buffer handed out and the rollback
   floor raised (re-checked and raised in one critical section: a floor committed meanwhile still wins).

Every byte is read from the source exactly once, and what is checked is what is used: a file rewritten while
it is being opened cannot slip in bytes that were not checked. Every failure is ``BundleRejected(check,
detail)``. Functions reading data that is not yet authenticated are named ``_parse_unverified_*``; they are
written to be safe on arbitrary bytes.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgeguard import __version__
from edgeguard._hardening import protect, release
from edgeguard._memory import wipe
from edgeguard._safeio import open_checked
from edgeguard.bundle import _format as fmt
from edgeguard.bundle._golden import decode_golden
from edgeguard.bundle._opened import OpenedBundle, VerifiedBundle
from edgeguard.bundle._output import parse_unverified_output
from edgeguard.bundle._rollback import MODEL_NAME_RE, RollbackFloor, check_model_name
from edgeguard.bundle.manifest import TENSOR_DTYPES, Manifest, TensorSpec, Tolerance
from edgeguard.clock import parse_time
from edgeguard.errors import BundleRejected
from edgeguard.keys import DeviceKey, TrustStore

__all__ = ["OpenedBundle", "VerifiedBundle", "open_bundle", "verify_bundle", "inspect_bundle"]

_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_CHANGED = "bundle file changed while it was being read"


@dataclass(frozen=True)
class _Header:
    manifest_len: int
    body_len: int
    signer_key_id: str
    index_digest: bytes  # the suite's digest of the index; the suite is in the manifest, checked later


class _Source:
    """Bundle bytes in memory or in a file, read so that every byte is read once and what is checked is
    what is used.

    ``bytes`` are immutable: chunks are zero-copy views of them. A file, or a mutable buffer someone else
    may change meanwhile, is copied into a private buffer (``scratch``) first; the caller hashes and
    decrypts that copy. Files are read with ``pread`` at explicit offsets, so several threads share one
    descriptor without a shared file position.
    """

    def __init__(self, source: Path | bytes | bytearray | memoryview) -> None:
        self._file: io.FileIO | None = None
        self._mem: memoryview | None = None
        self._lock = threading.Lock()  # seek + readinto where pread is missing
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._mem = memoryview(source).cast("B")
            self.size = self._mem.nbytes
            self.needs_scratch = not isinstance(source, bytes)
        else:
            # A file that cannot be read is an I/O problem (OSError), not a verdict on the bundle.
            # Unbuffered: reads land directly in the caller's buffer without an extra copy.
            # Opened like every file others may write: no link followed, a FIFO never waited on, regular only.
            fd, _ = open_checked(Path(source), what="bundle file", error=OSError)
            self._file = open(fd, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            self.size = os.fstat(self._file.fileno()).st_size
            self.needs_scratch = True

    def read(self, offset: int, n: int) -> bytes:
        """A private copy of ``n`` bytes (header, manifest, signature, index: bounded by the limits)."""
        if self._mem is not None:
            if offset + n > self.size:
                raise BundleRejected("malformed", "bundle is shorter than its header claims")
            return bytes(self._mem[offset : offset + n])
        buf = bytearray(n)
        self._read_into(memoryview(buf), offset)
        return bytes(buf)

    def chunk(self, offset: int, n: int, scratch: bytearray | None) -> memoryview:
        """``n`` bytes at ``offset`` that nobody else can change until the caller is done with them."""
        assert self._mem is not None or scratch is not None
        if scratch is None:
            assert self._mem is not None
            return self._mem[offset : offset + n]  # immutable bytes: a view is as good as a copy
        buf = memoryview(scratch)[:n]
        if self._mem is not None:
            buf[:] = self._mem[offset : offset + n]
        else:
            self._read_into(buf, offset)
        return buf

    def _read_into(self, buf: memoryview, offset: int) -> None:
        assert self._file is not None
        got = 0
        while got < len(buf):
            if hasattr(os, "preadv"):
                step = os.preadv(self._file.fileno(), [buf[got:]], offset + got)
            else:  # pragma: no cover - platforms without preadv
                with self._lock:
                    self._file.seek(offset + got)
                    step = self._file.readinto(buf[got:]) or 0
            if not step:  # the file shrank under us: treat like truncation
                raise BundleRejected("integrity", _CHANGED)
            got += step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._mem is not None:
            self._mem.release()


def _parse_unverified_header(raw: bytes, total_size: int, limits: fmt.BundleLimits) -> _Header:
    if total_size < fmt.HEADER_SIZE:
        raise BundleRejected("malformed", f"{total_size} bytes is too short for a bundle")
    magic, version, flags, manifest_len, body_len, kid, index_sha = fmt.HEADER.unpack(raw)
    if magic != fmt.MAGIC:
        raise BundleRejected("malformed", "not an EdgeGuard bundle (bad magic)")
    if version != fmt.FORMAT_VERSION:
        raise BundleRejected(
            "unsupported", f"bundle format version {version} (this runtime reads {fmt.FORMAT_VERSION})"
        )
    if flags != 0:
        raise BundleRejected("unsupported", f"unknown header flags {flags:#06x}")
    if manifest_len > limits.max_manifest_bytes:
        raise BundleRejected(
            "too large", f"manifest of {manifest_len} bytes exceeds the {limits.max_manifest_bytes} limit"
        )
    if manifest_len == 0:
        raise BundleRejected("malformed", "empty manifest")
    if body_len > limits.max_body_bytes():
        raise BundleRejected(
            "too large", f"body of {body_len} bytes exceeds the {limits.max_body_bytes()} limit"
        )
    if total_size < fmt.HEADER_SIZE + manifest_len + fmt.SIGNATURE_SIZE:
        raise BundleRejected("malformed", "bundle is shorter than its header, manifest and signature")
    return _Header(manifest_len, body_len, bytes(kid).hex(), bytes(index_sha))


def _bad(detail: str) -> NoReturn:
    raise BundleRejected("malformed", f"manifest: {detail}")


def _reject_constant(name: str) -> NoReturn:
    _bad(f"non-finite number {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys would let two JSON parsers read two different manifests from the same signed bytes.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            _bad(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_unverified_json(raw: bytes) -> Any:
    try:
        return json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleRejected("malformed", f"manifest is not valid JSON ({type(exc).__name__})") from None


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int = 2**53) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:  # type() excludes bool
        _bad(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def _str(d: Mapping[str, Any], key: str, max_len: int, pattern: str | None = None) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > max_len or (pattern is not None and not re.fullmatch(pattern, v)):
        _bad(f"{key} must be a string" + (f" matching {pattern}" if pattern else f" of <= {max_len} chars"))
    return v


def _number(v: Any, what: str) -> float:
    # JSON integers are unbounded: isfinite()/float() raise OverflowError beyond ~1.8e308, a bad value too.
    if type(v) not in (int, float) or (type(v) is int and abs(v) > 2**1023) or not math.isfinite(v):
        _bad(f"{what} must be a finite number")
    return float(v)


def _parse_unverified_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        _bad(f"{text!r} is not an ISO 8601 time")
    if t.tzinfo is None:
        _bad(f"time {text!r} has no timezone")
    return t


def _parse_unverified_tensors(d: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = d.get(key, [])
    if not isinstance(items, list) or len(items) > 64:
        _bad(f"{key} must be a list of at most 64 tensors")
    specs = []
    for t in items:
        if not isinstance(t, dict) or not set(t) <= {"name", "dtype", "shape", "range"}:
            _bad(f"{key}: each tensor is an object with name, dtype, shape and optional range")
        name = _str(t, "name", 256)
        dtype = _str(t, "dtype", 16)
        if dtype not in TENSOR_DTYPES:
            _bad(f"{key}: dtype {dtype!r} is not supported")
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > 8:
            _bad(f"{key}: shape must be a list of at most 8 axes")
        for axis in shape:
            if axis is not None and (type(axis) is not int or not 1 <= axis <= 2**31):
                _bad(f"{key}: each axis is a positive integer or null")
        rng = t.get("range")
        value_range = None
        if rng is not None:
            if not isinstance(rng, list) or len(rng) != 2:
                _bad(f"{key}: range must be [low, high]")
            lo, hi = _number(rng[0], "range"), _number(rng[1], "range")
            if lo > hi:
                _bad(f"{key}: range low > high")
            value_range = (lo, hi)
        specs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape), value_range=value_range))
    return tuple(specs)


_MANIFEST_KEYS = frozenset(
    {
        "format",
        "name",
        "version",
        "created",
        "not_after",
        "payload_sha256",
        "payload_size",
        "chunk_size",
        "publisher_key_id",
        "recipient_key_ids",
        "inputs",
        "outputs",
        "min_runtime",
        "golden_count",
        "golden_size",
        "golden_tolerance",
        "description",
        "bundle_id",
        "key_commitment",
        "preprocess",
        "postprocess",
        "input_stats",
        "quantization",
        "defence",
        "suite",
        "output",
    }
)
_HEX16, _HEX32, _HEX64 = r"[0-9a-f]{16}", r"[0-9a-f]{32}", r"[0-9a-f]{64}"


def _parse_unverified_manifest(raw: bytes, limits: fmt.BundleLimits) -> Manifest:
    d = _parse_unverified_json(raw)
    if not isinstance(d, dict):
        _bad("top level must be an object")
    unknown = set(d) - _MANIFEST_KEYS
    if unknown:
        _bad(f"unknown field {sorted(unknown)[0]!r}")
    fmt_name = d.get("format")
    if fmt_name not in ("onnx", "tflite"):
        _bad("format must be 'onnx' or 'tflite'")
    name = _str(d, "name", 64)
    if not MODEL_NAME_RE.fullmatch(name):
        _bad(f"name {name!r} must match {MODEL_NAME_RE.pattern}")
    not_after = d.get("not_after")
    if not_after is not None:
        _parse_unverified_time(_str(d, "not_after", 64))
    recipients = d.get("recipient_key_ids")
    if not isinstance(recipients, list) or not 1 <= len(recipients) <= limits.max_recipients:
        _bad(f"recipient_key_ids must list 1..{limits.max_recipients} key ids")
    for r in recipients:
        if not isinstance(r, str) or not re.fullmatch(_HEX16, r):
            _bad("recipient key ids are 16 lowercase hex digits")
    if len(set(recipients)) != len(recipients):
        _bad("duplicate recipient key id")
    tol = d.get("golden_tolerance", {})
    if not isinstance(tol, dict) or not set(tol) <= {"rtol", "atol"}:
        _bad("golden_tolerance must be an object with rtol and atol")
    tolerance = Tolerance(**{k: _number(v, f"golden_tolerance.{k}") for k, v in tol.items()})
    if tolerance.rtol < 0 or tolerance.atol < 0:
        _bad("golden_tolerance must not be negative")
    suite = d.get("suite", fmt.DEFAULT_SUITE)
    if not isinstance(suite, str) or len(suite) > 64:
        _bad("suite must be a string of <= 64 chars")
    if suite not in fmt.SUITES:
        # Signed, so not an attack on the reader: a publisher newer than this runtime.
        raise BundleRejected(
            "unsupported", f"cipher suite {suite[:64]!r} (this runtime reads {', '.join(fmt.SUITES)})"
        )
    extras: dict[str, Mapping[str, Any] | None] = {}
    for key in ("preprocess", "postprocess", "input_stats", "quantization", "defence"):
        v = d.get(key)
        if v is not None and not isinstance(v, dict):
            _bad(f"{key} must be an object")
        extras[key] = v
    return Manifest(
        format=fmt_name,
        name=name,
        version=_int(d, "version", 0),
        created=_str(d, "created", 64),
        payload_sha256=_str(d, "payload_sha256", 64, _HEX64),
        payload_size=_int(d, "payload_size", 1, 2**62),
        chunk_size=_int(d, "chunk_size", 1, 2**31),
        publisher_key_id=_str(d, "publisher_key_id", 16, _HEX16),
        recipient_key_ids=tuple(recipients),
        inputs=_parse_unverified_tensors(d, "inputs"),
        outputs=_parse_unverified_tensors(d, "outputs"),
        not_after=not_after,
        min_runtime=_str(d, "min_runtime", 32, r"\d+(\.\d+){0,2}"),
        golden_count=_int(d, "golden_count", 0, 10_000),
        golden_size=_int(d, "golden_size", 0, 2**62),
        golden_tolerance=tolerance,
        suite=suite,
        description=_str(d, "description", 4096) if "description" in d else "",
        bundle_id=_str(d, "bundle_id", 32, _HEX32),
        key_commitment=_str(d, "key_commitment", 64, _HEX64),
        output=parse_unverified_output(d.get("output"), has_postprocess=extras["postprocess"] is not None,
                                       outputs=len(d.get("outputs") or ())),
        **extras,
    )


def _check_layout(header: _Header, m: Manifest, total_size: int, limits: fmt.BundleLimits) -> fmt.Layout:
    """The signed manifest's sizes must fit the limits and describe the signed body exactly."""
    if m.payload_size > limits.max_model_bytes:
        raise BundleRejected("too large", f"model of {m.payload_size} bytes exceeds {limits.max_model_bytes}")
    if m.golden_size > limits.max_golden_bytes:
        raise BundleRejected("too large", f"golden vectors of {m.golden_size} bytes exceed the limit")
    if len(m.recipient_key_ids) > limits.max_recipients:
        raise BundleRejected(
            "too large", f"{len(m.recipient_key_ids)} recipients exceed {limits.max_recipients}"
        )
    if m.chunk_size > limits.max_chunk_size:
        raise BundleRejected("too large", f"chunk size {m.chunk_size} exceeds {limits.max_chunk_size}")
    if m.chunk_size < limits.min_chunk_size:
        raise BundleRejected("malformed", f"chunk size {m.chunk_size} is below {limits.min_chunk_size}")
    if (m.golden_count == 0) != (m.golden_size == 0):
        raise BundleRejected("malformed", "golden_count and golden_size disagree")
    if m.publisher_key_id != header.signer_key_id:
        raise BundleRejected("malformed", "manifest names a different publisher key than the header")
    layout = fmt.Layout(
        recipients=len(m.recipient_key_ids),
        chunk_size=m.chunk_size,
        golden_size=m.golden_size,
        model_size=m.payload_size,
    )
    if header.body_len != layout.body_len:
        raise BundleRejected(
            "malformed", f"body length {header.body_len} does not match the manifest ({layout.body_len})"
        )
    if total_size != fmt.HEADER_SIZE + header.manifest_len + fmt.SIGNATURE_SIZE + header.body_len:
        raise BundleRejected("integrity", "bundle is truncated or has trailing bytes")
    return layout


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class _Checked:
    """Steps 1-7 passed: the signed manifest, the layout it implies and the authenticated index."""

    verified: VerifiedBundle
    layout: fmt.Layout
    body_start: int
    index: bytes  # wrapped keys || chunk table, read once and matched against the signed digest


def _verify(
    src: _Source,
    *,
    trust: TrustStore,
    state_dir: Path | None,
    now: datetime | None,
    limits: fmt.BundleLimits,
    device_key_id: str | None,
    model_name: str | None,
) -> _Checked:
    head = src.read(0, min(src.size, fmt.HEADER_SIZE))  # 64 bytes at most
    header = _parse_unverified_header(head, src.size, limits)
    # Steps 2-3: trust, then the signature over header || manifest (bounded by the limit checked above).
    # Each part is read once and only the copy that was verified is used afterwards.
    key = trust.signer(header.signer_key_id)
    manifest_bytes = src.read(fmt.HEADER_SIZE, header.manifest_len)
    signature = src.read(fmt.HEADER_SIZE + header.manifest_len, fmt.SIGNATURE_SIZE)
    try:
        key.verify(signature, head + manifest_bytes)
    except InvalidSignature:
        raise BundleRejected("signature", f"signature by {header.signer_key_id} does not verify") from None
    # Step 4: from here on the manifest is the publisher's statement; still validated strictly.
    manifest = _parse_unverified_manifest(manifest_bytes, limits)
    layout = _check_layout(header, manifest, src.size, limits)
    runtime = _version_tuple(__version__)
    # (0, 0, 0) is an uninstalled source tree (version unknown): it is the newest code, not the oldest.
    if runtime != (0, 0, 0) and _version_tuple(manifest.min_runtime) > runtime:
        raise BundleRejected("unsupported", f"bundle needs EdgeGuard >= {manifest.min_runtime}")
    # Step 5: expiry, then rollback.
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (datetime.now(timezone.utc))")
    # The publisher signed this bundle at ``created``: no honest clock reads earlier, so a clock wound back
    # (or a fresh board in 1970) cannot make "now" earlier than that (docs/security.md, the clock).
    created = parse_time(manifest.created)
    if created is not None:
        now = max(now, created)
    if manifest.not_after is not None and now > _parse_unverified_time(manifest.not_after):
        raise BundleRejected(
            "expired", f"{manifest.name} v{manifest.version} expired at {manifest.not_after}"
        )
    if state_dir is not None:
        RollbackFloor(state_dir).check(manifest.name, manifest.version, model_name=model_name)
    else:
        check_model_name(manifest.name, model_name)
    # Step 6: recipient (cheap) before reading anything proportional to the body.
    if device_key_id is not None and device_key_id not in manifest.recipient_key_ids:
        raise BundleRejected("not a recipient", f"bundle is not sealed for device key {device_key_id}")
    # Step 7: the index (wrapped keys + chunk table; its size follows from the signed, bounded manifest).
    body_start = fmt.HEADER_SIZE + header.manifest_len + fmt.SIGNATURE_SIZE
    index = src.read(body_start, layout.index_len)
    # The suite comes from the signed manifest, so the index is hashed with the function the publisher chose.
    if not hmac.compare_digest(fmt.SUITES[manifest.suite].digest(index), header.index_digest):
        raise BundleRejected("integrity", "wrapped keys or chunk table do not match the signed index digest")
    return _Checked(VerifiedBundle(manifest, manifest_bytes, header.signer_key_id), layout, body_start, index)


class _ChunkPass:
    """Step 8 (and the digest-only pass of ``verify_bundle``): every chunk is read once into a private
    buffer, hashed, compared with the signed table and only then, from that same buffer, decrypted into its
    place in the output. Several threads may take chunks in order from a shared counter; each owns one
    scratch buffer (none for ``bytes``), so extra memory is threads x (chunk + tag), kept within a tenth
    of the plaintext."""

    def __init__(
        self,
        src: _Source,
        checked: _Checked,
        *,
        content_key: bytes | None,
        outs: Mapping[int, memoryview],
    ) -> None:
        self._src, self._layout, self._start = src, checked.layout, checked.body_start
        self._table = memoryview(checked.index)[checked.layout.table_offset :]
        self._digest = fmt.SUITES[checked.verified.manifest.suite].digest
        aead = fmt.SUITES[checked.verified.manifest.suite].aead
        self._aes = self._chacha = None
        if content_key is not None and aead == "aes256gcm":
            self._aes = algorithms.AES(content_key)
        elif content_key is not None:
            self._chacha = ChaCha20Poly1305(content_key)
        self._binding = fmt.manifest_binding(checked.verified.manifest_bytes)
        self._outs = outs
        self._lock = threading.Lock()
        self._next = 0
        self._failures: list[tuple[int, BaseException]] = []

    def run(self, threads: int) -> None:
        layout = self._layout
        if self._src.needs_scratch:
            # Each thread owns a scratch buffer: keep them within a tenth of the plaintext, so the extra
            # peak memory of a file open stays <= 1.1x the model. This only limits threads for small models.
            budget = (layout.golden_size + layout.model_size) // 10
            threads = min(threads, budget // (layout.chunk_size + fmt.TAG_SIZE))
        threads = max(1, min(threads, layout.chunks))
        helpers = [threading.Thread(target=self._work, daemon=True) for _ in range(threads - 1)]
        for t in helpers:
            t.start()
        try:
            self._work()  # the calling thread is one of the workers: 1 thread = no threads started at all
        finally:
            with self._lock:  # if the caller was interrupted, helpers start no new chunk
                self._next = layout.chunks
            for t in helpers:
                t.join()  # nothing writes into the output after this (it may be wiped next)
        if self._failures:
            # Chunks are taken in order and every taken chunk is finished before the threads stop, so the
            # smallest failing chunk is the first bad one, whatever the thread timing: a stable message.
            raise min(self._failures, key=lambda f: f[0])[1]

    def _work(self) -> None:
        scratch = bytearray(self._layout.chunk_size + fmt.TAG_SIZE) if self._src.needs_scratch else None
        while True:
            with self._lock:
                if self._failures or self._next >= self._layout.chunks:
                    return
                k, self._next = self._next, self._next + 1
            try:
                self._one(k, scratch)
            except BaseException as exc:  # re-raised by run() in the calling thread
                with self._lock:
                    self._failures.append((k, exc))
                return

    def _one(self, k: int, scratch: bytearray | None) -> None:
        c = self._layout.chunk(k)
        n = c.plain_size
        ct = self._src.chunk(self._start + c.body_offset, n + fmt.TAG_SIZE, scratch)
        # hashlib releases the GIL on buffers this large, so threads hash in parallel.
        expected = self._table[k * fmt.DIGEST_SIZE : (k + 1) * fmt.DIGEST_SIZE]
        if not hmac.compare_digest(self._digest(ct), expected):
            raise BundleRejected(
                "integrity", f"chunk {c.index} of stream {c.stream} does not match its signed digest"
            )
        if self._chacha is not None:
            self._open_chacha(c, ct)
            return
        if self._aes is None:
            return
        decryptor = Cipher(
            self._aes, modes.GCM(fmt.chunk_nonce(c.stream, c.index, c.final), bytes(ct[n:]))
        ).decryptor()
        decryptor.authenticate_additional_data(fmt.chunk_aad(self._binding, c.stream, c.index, c.final))
        # Decrypt the very bytes just hashed (``ct`` is private) straight into the final buffer: no second
        # read, no copy. finalize() checks the tag before anyone may look at the buffer.
        decryptor.update_into(ct[:n], self._outs[c.stream][c.plain_offset : c.plain_offset + n])
        try:
            decryptor.finalize()
        except InvalidTag:
            raise BundleRejected(
                "integrity", f"chunk {c.index} of stream {c.stream} failed authentication"
            ) from None

    def _open_chacha(self, c: fmt.ChunkRef, ct: memoryview) -> None:
        n = c.plain_size
        assert self._chacha is not None
        nonce = fmt.chunk_nonce(c.stream, c.index, c.final)
        aad = fmt.chunk_aad(self._binding, c.stream, c.index, c.final)
        out = self._outs[c.stream][c.plain_offset : c.plain_offset + n]
        try:
            if hasattr(self._chacha, "decrypt_into"):
                # Straight into the final buffer, as GCM's update_into: no plaintext copy left in an
                # immutable ``bytes`` that nobody can wipe. On a bad tag open_bundle zeroes the buffer.
                self._chacha.decrypt_into(nonce, ct, aad, out)
                return
            # Older cryptography (no decrypt_into): the tag is checked, then a new plaintext of one chunk is
            # copied into place; that copy is freed at once but cannot be zeroed (docs/bundle.md, Caveats).
            plain = self._chacha.decrypt(nonce, ct, aad)
        except InvalidTag:
            raise BundleRejected(
                "integrity", f"chunk {c.index} of stream {c.stream} failed authentication"
            ) from None
        if len(plain) != n:  # cannot happen with a 16-byte tag; the output slice must not be resized
            raise BundleRejected("malformed", f"chunk {c.index} of stream {c.stream} has the wrong size")
        out[:] = plain


def verify_bundle(
    source: Path | bytes,
    *,
    trust: TrustStore,
    state_dir: Path | None = None,
    now: datetime | None = None,
    limits: fmt.BundleLimits | None = None,
    device_key: DeviceKey | None = None,
    model_name: str | None = None,
) -> VerifiedBundle:
    """Steps 1-7 and every chunk's digest against the signed table (everything but decryption). Never
    writes the rollback floor. ``model_name``: the only model name accepted (``model.name``)."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        checked = _verify(
            src,
            trust=trust,
            state_dir=state_dir,
            now=now,
            limits=limits,
            device_key_id=device_key.key_id if device_key else None,
            model_name=model_name,
        )
        _ChunkPass(src, checked, content_key=None, outs={}).run(limits.open_threads())
        return checked.verified
    finally:
        src.close()


def _unwrap(checked: _Checked, device_key: DeviceKey) -> bytes:
    m = checked.verified.manifest
    slot = m.recipient_key_ids.index(device_key.key_id) * fmt.WRAPPED_KEY_SIZE
    wrapped = checked.index[slot : slot + fmt.WRAPPED_KEY_SIZE]  # authenticated by step 7
    try:
        info = fmt.hpke_info(checked.verified.manifest_bytes)
        key = _HPKE.decrypt(wrapped, device_key.private_key, info=info)
    except (InvalidTag, ValueError):
        raise BundleRejected("integrity", "content key does not unwrap with this device key") from None
    if len(key) != fmt.CONTENT_KEY_SIZE:
        raise BundleRejected("malformed", "content key has the wrong length")
    if not hmac.compare_digest(fmt.key_commitment(key), m.key_commitment):
        raise BundleRejected("integrity", "content key does not match the manifest's key commitment")
    return key


def open_bundle(
    source: Path | bytes,
    *,
    trust: TrustStore,
    device_key: DeviceKey,
    state_dir: Path | None,
    now: datetime | None = None,
    limits: fmt.BundleLimits | None = None,
    commit_floor: bool = True,
    model_name: str | None = None,
) -> OpenedBundle:
    """Verify, unwrap and decrypt a bundle into memory. With ``state_dir`` and ``commit_floor`` the rollback
    floor is raised to this version after every check has passed, just before returning (and the open is
    refused if a floor committed meanwhile is higher). ``model_name``: the only model name accepted
    (``model.name``); without it a state dir's pinned slot decides."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        checked = _verify(
            src,
            trust=trust,
            state_dir=state_dir,
            now=now,
            limits=limits,
            device_key_id=device_key.key_id,
            model_name=model_name,
        )
        m = checked.verified.manifest
        content_key = _unwrap(checked, device_key)
        golden_buf = bytearray(m.golden_size)
        model = bytearray(m.payload_size)  # the one plaintext buffer, sized by the signed, bounded manifest
        # Before a byte is decrypted into them: out of core dumps, and locked out of swap where allowed.
        protect(model)
        protect(golden_buf)
        try:
            outs = {fmt.STREAM_GOLDEN: memoryview(golden_buf), fmt.STREAM_MODEL: memoryview(model)}
            _ChunkPass(src, checked, content_key=content_key, outs=outs).run(limits.open_threads())
            golden = decode_golden(golden_buf, m, limits) if m.golden_size else ()
        except BaseException:
            # Unauthenticated or unwanted plaintext never leaves: zero both buffers before propagating.
            wipe(model)
            wipe(golden_buf)
            release(model)
            release(golden_buf)
            raise
        wipe(golden_buf)  # decoded into arrays of their own: the archive's plaintext is not handed out
        release(golden_buf)
        opened = OpenedBundle(m, model, golden, state_dir, model_name=model_name)
        if commit_floor:
            try:
                opened.commit_rollback_floor()
            except BaseException:
                opened.wipe()
                raise
        return opened
    finally:
        src.close()


def inspect_bundle(source: Path | bytes, *, limits: fmt.BundleLimits | None = None) -> dict[str, object]:
    """Header and manifest as JSON-able data, WITHOUT checking the signature (say so to the user)."""
    limits = limits or fmt.BundleLimits()
    src = _Source(source)
    try:
        header = _parse_unverified_header(src.read(0, min(src.size, fmt.HEADER_SIZE)), src.size, limits)
        manifest = _parse_unverified_manifest(src.read(fmt.HEADER_SIZE, header.manifest_len), limits)
        return {
            "signature_checked": False,
            "signer_key_id": header.signer_key_id,
            "bundle_bytes": src.size,
            "manifest": manifest.to_json(),
            # What of a result may leave a device (docs/security.md, "Output hardening").
            "output_hardening": (
                manifest.output.to_json() if manifest.output is not None
                else "not declared: results carry the raw output tensors when there is no postprocess"
            ),
        }
    finally:
        src.close()
