"""Publisher side: seal a model for one or more devices (``edgeguard pack``).

Everything here runs on the publisher's machine on trusted input; a bad option is a ``ConfigError``. The
finished manifest is run through the device's own parser before it is signed, so ``pack`` cannot produce a
bundle that a device would reject as malformed.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from edgeguard.bundle import _format as fmt
from edgeguard.bundle._golden import decode_golden, encode_golden, split_golden_keys
from edgeguard.bundle._open import _parse_unverified_manifest
from edgeguard.bundle._output import parse_unverified_output
from edgeguard.bundle._reference import introspect, run_reference
from edgeguard.bundle.manifest import GoldenSample, Manifest, ModelFormat, TensorSpec, Tolerance
from edgeguard.errors import BundleRejected, ConfigError
from edgeguard.keys import PublisherKey, RecipientKey

__all__ = ["pack_bundle", "load_golden_npz", "load_meta", "detect_format", "resolve_suite", "SUITE_CHOICES"]

_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_META_KEYS = frozenset(
    {
        "inputs",
        "outputs",
        "preprocess",
        "postprocess",
        "input_stats",
        "quantization",
        "defence",
        "tolerance",
        "description",
        "min_runtime",
        "output",
    }
)


SUITE_CHOICES = (*fmt.SUITES, "auto")
# Device profiles whose CPUs have neither the ARMv8 AES nor the SHA-2 instructions (BCM2711 of the Pi 4,
# BCM2710A1 of the Pi Zero 2 W and Pi 3): AES-GCM and SHA-256 run there in slow table-free software.
_WITHOUT_CRYPTO_INSTRUCTIONS = frozenset({"raspberry-pi-4", "raspberry-pi-zero-2", "raspberry-pi-3"})


def resolve_suite(suite: str, profiles: Sequence[str] = ()) -> str:
    """``pack --suite``: a suite name as given, or ``auto``: ChaCha20-Poly1305 + BLAKE2b when any recipient's
    device profile is known to lack AES/SHA instructions (the slowest board decides: ChaCha still runs at
    GB/s on the others), else the default AES-256-GCM + SHA-256."""
    if suite == "auto":
        slow = any(p in _WITHOUT_CRYPTO_INSTRUCTIONS for p in profiles)
        return "chacha20poly1305-blake2b" if slow else fmt.DEFAULT_SUITE
    if suite not in fmt.SUITES:
        raise ConfigError(f"unknown cipher suite {suite!r} (choose from {', '.join(SUITE_CHOICES)})")
    return suite


def detect_format(path: Path | None, data: bytes) -> ModelFormat:
    suffix = path.suffix.lower() if path else ""
    if suffix == ".tflite" or data[4:8] == b"TFL3":  # TFLite flatbuffers carry the "TFL3" identifier
        return "tflite"
    if suffix in ("", ".onnx"):
        return "onnx"
    raise ConfigError(f"cannot tell the model format of {path} (expected .onnx or .tflite)")


def _tensor_from_meta(t: Any, where: str) -> TensorSpec:
    if not isinstance(t, dict) or not {"name", "dtype", "shape"} <= set(t):
        raise ConfigError(f"--meta {where}: each tensor needs name, dtype and shape")
    rng = t.get("range")
    try:
        return TensorSpec(
            name=str(t["name"]),
            dtype=str(t["dtype"]),
            shape=tuple(None if d is None else int(d) for d in t["shape"]),
            value_range=None if rng is None else (float(rng[0]), float(rng[1])),
        )
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ConfigError(f"--meta {where}: bad tensor {t.get('name')!r}: {exc}") from None


def _tolerance_from_meta(tol: Any) -> Tolerance:
    if not isinstance(tol, dict) or not set(tol) <= {"rtol", "atol"}:
        raise ConfigError('--meta tolerance must be {"rtol": number, "atol": number}')
    try:
        return Tolerance(**{k: float(v) for k, v in tol.items()})
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: float() of a huge JSON integer
        raise ConfigError(f"--meta tolerance: {exc}") from None


def load_meta(path: Path) -> dict[str, Any]:
    """Read ``--meta FILE.json``: optional inputs, outputs, preprocess, postprocess, input_stats,
    quantization, tolerance {rtol, atol} and description."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --meta {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"--meta {path}: top level must be a JSON object")
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise ConfigError(
            f"--meta {path}: unknown key {sorted(unknown)[0]!r} (allowed: {sorted(_META_KEYS)})"
        )
    return meta


def load_golden_npz(path: Path) -> list[dict[str, dict[str, np.ndarray]]]:
    """Samples of a golden ``.npz`` as [{"in": {...}, "out": {...}}]; "out" may be empty (computed later)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            groups = split_golden_keys(list(npz.files))
            return [
                {side: {n: np.array(npz[k]) for n, k in groups[i][side].items()} for side in ("in", "out")}
                for i in range(len(groups))
            ]
    # zipfile's own errors (BadZipFile, RuntimeError, zlib.error) are neither OSError nor ValueError.
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, zlib.error, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read golden vectors {path}: {exc}") from None


def _iso(t: datetime) -> str:
    if t.tzinfo is None:
        raise ConfigError("expiry time needs a timezone (e.g. 2027-01-01T00:00:00Z)")
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _seal_stream(
    aead: AESGCM | ChaCha20Poly1305, data: bytes, *, chunk_size: int, binding: bytes, stream: int
) -> list[bytes]:
    """The chunks of one stream, each ciphertext || 16-byte tag."""
    count = fmt.chunk_count(len(data), chunk_size)
    view = memoryview(data)
    chunks = []
    for index in range(count):
        final = index == count - 1
        piece = view[index * chunk_size : (index + 1) * chunk_size]
        chunks.append(
            aead.encrypt(
                fmt.chunk_nonce(stream, index, final), piece, fmt.chunk_aad(binding, stream, index, final)
            )
        )
    return chunks


def assemble(
    manifest_bytes: bytes,
    wrapped_keys: Sequence[bytes],
    chunks: Sequence[bytes],
    sign_key: PublisherKey,
    *,
    suite: str = fmt.DEFAULT_SUITE,
) -> bytes:
    """Header, manifest, signature and body around already sealed parts (``chunks``: golden stream then
    model stream, in order). The chunk table and the index digest are computed here, from the chunks, with
    ``suite``'s digest (which must be the suite the manifest names)."""
    digest = fmt.SUITES[suite].digest
    index = b"".join(wrapped_keys) + b"".join(digest(c) for c in chunks)
    body_len = len(index) + sum(len(c) for c in chunks)
    header = fmt.HEADER.pack(
        fmt.MAGIC,
        fmt.FORMAT_VERSION,
        0,
        len(manifest_bytes),
        body_len,
        bytes.fromhex(sign_key.key_id),
        digest(index),
    )
    signature = sign_key.private_key.sign(header + manifest_bytes)
    return b"".join([header, manifest_bytes, signature, index, *chunks])


def pack_bundle(
    model: bytes,
    *,
    name: str,
    version: int,
    sign_key: PublisherKey,
    recipients: Sequence[RecipientKey],
    model_format: ModelFormat | None = None,
    golden: Sequence[Mapping[str, Mapping[str, np.ndarray]]] = (),
    not_after: datetime | None = None,
    meta: Mapping[str, Any] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    now: datetime | None = None,
    limits: fmt.BundleLimits | None = None,
    suite: str = fmt.DEFAULT_SUITE,
    recipient_profiles: Sequence[str] = (),
) -> bytes:
    """Seal ``model`` for ``recipients`` and sign it; return the ``.egm`` bytes.

    ``suite``: a name of ``_format.SUITES`` or ``auto`` (decided by ``recipient_profiles``, the recipients'
    device profile names, see ``resolve_suite``).

    ``golden`` holds samples {"in": {name: array}, "out": {name: array}}; a sample without outputs gets them
    from a CPU reference run of the model. ``meta`` may give inputs/outputs (else read from the model) and the
    optional preprocess/postprocess/input_stats/quantization/tolerance/description.
    """
    limits = limits or fmt.BundleLimits()
    suite = resolve_suite(suite, recipient_profiles)
    meta = dict(meta or {})
    for key, kind in (
        ("inputs", list),
        ("outputs", list),
        ("preprocess", dict),
        ("postprocess", dict),
        ("input_stats", dict),
        ("quantization", dict),
        ("defence", dict),
        ("output", dict),
        ("description", str),
        ("min_runtime", str),
    ):
        if key in meta and not isinstance(meta[key], kind):
            raise ConfigError(f"meta {key} must be a JSON {'array' if kind is list else kind.__name__}")
    if not recipients:
        raise ConfigError("pack needs at least one --recipient")
    if len({r.key_id for r in recipients}) != len(recipients):
        raise ConfigError("the same recipient key is given twice")
    model_format = model_format or detect_format(None, model)
    if "inputs" in meta and "outputs" in meta:
        inputs = tuple(_tensor_from_meta(t, "inputs") for t in meta["inputs"])
        outputs = tuple(_tensor_from_meta(t, "outputs") for t in meta["outputs"])
    else:
        found_in, found_out = introspect(model, model_format)
        inputs = (
            tuple(_tensor_from_meta(t, "inputs") for t in meta["inputs"]) if "inputs" in meta else found_in
        )
        outputs = (
            tuple(_tensor_from_meta(t, "outputs") for t in meta["outputs"])
            if "outputs" in meta
            else found_out
        )
    samples = [
        GoldenSample(
            inputs=dict(s["in"]),
            outputs=dict(s["out"]) if s.get("out") else run_reference(model, model_format, s["in"]),
        )
        for s in golden
    ]
    in_names, out_names = {t.name for t in inputs}, {t.name for t in outputs}
    for i, sample in enumerate(samples):
        if set(sample.inputs) != in_names or not set(sample.outputs) <= out_names:
            raise ConfigError(
                f"golden sample {i} has inputs {sorted(sample.inputs)} and outputs {sorted(sample.outputs)}; "
                f"the model has inputs {sorted(in_names)} and outputs {sorted(out_names)}"
            )
    golden_bytes = encode_golden(samples) if samples else b""
    tol = meta.get("tolerance", {})
    try:  # output hardening: the device's own reader judges the declaration
        output = parse_unverified_output(
            meta.get("output"), has_postprocess=meta.get("postprocess") is not None, outputs=len(outputs)
        )
    except BundleRejected as exc:
        raise ConfigError(f"cannot pack: {exc.detail}") from None
    content_key = AESGCM.generate_key(bit_length=256)  # fresh per bundle (os.urandom inside)
    manifest = Manifest(
        format=model_format,
        name=name,
        version=version,
        created=_iso(now or datetime.now(timezone.utc)),
        payload_sha256=hashlib.sha256(model).hexdigest(),
        payload_size=len(model),
        chunk_size=chunk_size,
        publisher_key_id=sign_key.key_id,
        recipient_key_ids=tuple(r.key_id for r in recipients),
        inputs=inputs,
        outputs=outputs,
        not_after=_iso(not_after) if not_after else None,
        min_runtime=str(meta.get("min_runtime", "0.1.0")),  # older runtimes refuse format 2 by its header
        golden_count=len(samples),
        golden_size=len(golden_bytes),
        golden_tolerance=_tolerance_from_meta(tol),
        preprocess=meta.get("preprocess"),
        postprocess=meta.get("postprocess"),
        input_stats=meta.get("input_stats"),
        quantization=meta.get("quantization"),
        defence=meta.get("defence"),
        description=str(meta.get("description", "")),
        bundle_id=os.urandom(16).hex(),
        key_commitment=fmt.key_commitment(content_key),
        suite=suite,
        output=output,
    )
    manifest_bytes = json.dumps(manifest.to_json(), separators=(",", ":"), sort_keys=True).encode("utf-8")
    try:  # the device's parser is the judge of what a valid manifest is
        _parse_unverified_manifest(manifest_bytes, limits)
    except BundleRejected as exc:
        raise ConfigError(f"cannot pack: {exc.detail}") from None
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise ConfigError(
            f"manifest of {len(manifest_bytes)} bytes exceeds the {limits.max_manifest_bytes} limit"
        )
    if not limits.min_chunk_size <= chunk_size <= limits.max_chunk_size:
        raise ConfigError(f"chunk size must be within [{limits.min_chunk_size}, {limits.max_chunk_size}]")
    if len(model) > limits.max_model_bytes or len(golden_bytes) > limits.max_golden_bytes:
        raise ConfigError("model or golden vectors exceed the bundle size limits")
    if golden_bytes:
        try:  # the device's decoder judges the golden vectors too
            decode_golden(bytearray(golden_bytes), manifest, limits)
        except BundleRejected as exc:
            raise ConfigError(f"cannot pack: {exc.detail}") from None

    info = fmt.hpke_info(manifest_bytes)
    wrapped = [_HPKE.encrypt(content_key, r.public_key, info=info) for r in recipients]
    aead: AESGCM | ChaCha20Poly1305 = (
        ChaCha20Poly1305(content_key) if fmt.SUITES[suite].aead == "chacha20poly1305" else AESGCM(content_key)
    )
    binding = fmt.manifest_binding(manifest_bytes)
    chunks = [
        *_seal_stream(aead, golden_bytes, chunk_size=chunk_size, binding=binding, stream=fmt.STREAM_GOLDEN),
        *_seal_stream(aead, model, chunk_size=chunk_size, binding=binding, stream=fmt.STREAM_MODEL),
    ]
    return assemble(manifest_bytes, wrapped, chunks, sign_key, suite=suite)


def read_model(path: Path) -> tuple[bytes, ModelFormat]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read model {path}: {exc.strerror or exc}") from None
    return data, detect_format(path, data)
