"""Every way of changing a bundle is rejected with the right check, and nothing is handed out."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgeguard.bundle import BundleLimits, open_bundle, pack_bundle
from edgeguard.bundle import _format as fmt
from edgeguard.errors import BundleRejected
from edgeguard.keys import TrustStore
from tests.bundle.conftest import (
    TINY_CHUNK,
    Forge,
    Parts,
    Party,
    body_offset,
    layout_of,
    seal,
    split,
    tiny_onnx,
)


def _check(bundle: bytes, party: Party, **kw: Any) -> str:
    kw.setdefault("state_dir", None)
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bundle, trust=party.trust, device_key=party.device, **kw)
    assert "\n" not in str(exc.value)
    return exc.value.check


def test_valid_tiny_bundle_opens(party: Party, tiny_bundle: bytes, tiny_model: bytes) -> None:
    assert (
        open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None).model
        == tiny_model
    )


def test_every_bit_flip_in_header_manifest_and_signature(party: Party, tiny_bundle: bytes) -> None:
    end = body_offset(tiny_bundle)
    seen: dict[str, int] = {}
    data = bytearray(tiny_bundle)
    for byte in range(end):
        for bit in range(8):
            data[byte] ^= 1 << bit
            try:
                open_bundle(bytes(data), trust=party.trust, device_key=party.device, state_dir=None)
            except BundleRejected as exc:
                seen[exc.check] = seen.get(exc.check, 0) + 1
            else:
                pytest.fail(f"flip of bit {bit} in byte {byte} was accepted")
            data[byte] ^= 1 << bit
    assert sum(seen.values()) == end * 8
    # Manifest and signature flips fail the signature; header flips fail early where they can.
    assert seen["signature"] > (end - fmt.HEADER_SIZE) * 8 - 64
    assert {"malformed", "untrusted signer", "too large"} <= set(seen)


def test_thousand_random_payload_bit_flips(party: Party, tiny_bundle: bytes) -> None:
    rng = random.Random(1234)
    start = body_offset(tiny_bundle)
    for _ in range(1000):
        data = bytearray(tiny_bundle)
        data[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
        assert _check(bytes(data), party) == "integrity"


def test_truncation_at_every_chunk_boundary_and_mid_chunk(
    party: Party, tiny_bundle: bytes, forge: Forge
) -> None:
    parts = split(tiny_bundle)
    layout = layout_of(parts.manifest)
    start = body_offset(tiny_bundle)
    refs = [layout.chunk(k) for k in range(layout.chunks)]
    assert sum(c.stream == fmt.STREAM_MODEL for c in refs) >= 8
    cuts = [start + c.body_offset for c in refs] + [start + c.body_offset + 100 for c in refs]
    cuts += [start, start + 5, start + layout.index_len - 1, len(tiny_bundle) - 1]
    for cut in cuts:
        assert _check(tiny_bundle[:cut], party) == "integrity", cut
    # Re-signed by a trusted publisher with a manifest claiming the shorter size: the wrapped key was bound
    # to the original manifest (HPKE info) and no longer unwraps.
    chunks = parts.model_chunks
    shorter = forge(tiny_bundle, lambda p: p.with_model_chunks(chunks[:3], payload_size=3 * TINY_CHUNK))
    with pytest.raises(BundleRejected, match="does not unwrap"):
        open_bundle(shorter, trust=party.trust, device_key=party.device, state_dir=None)


def _aead_layer(chunks: list[bytes], model_size: int, key: bytes, golden_size: int = 0) -> bytearray:
    """Run the chunk pass alone, with a table that matches ``chunks``: what is left when the digests pass
    (someone holding the content key and a trusted publisher key), so only GCM can refuse."""
    from edgeguard.bundle._open import _Checked, _ChunkPass, _Source
    from edgeguard.bundle._opened import VerifiedBundle
    from edgeguard.bundle.manifest import Manifest

    layout = fmt.Layout(recipients=0, chunk_size=1024, golden_size=golden_size, model_size=model_size)
    table = b"".join(hashlib.sha256(c).digest() for c in chunks)
    m = Manifest(
        format="onnx",
        name="t",
        version=1,
        created="",
        payload_sha256="",
        payload_size=model_size,
        chunk_size=1024,
        publisher_key_id="",
        recipient_key_ids=(),
    )
    checked = _Checked(VerifiedBundle(m, b"manifest", ""), layout, 0, table)
    golden, model = bytearray(golden_size), bytearray(model_size)
    outs = {fmt.STREAM_GOLDEN: memoryview(golden), fmt.STREAM_MODEL: memoryview(model)}
    _ChunkPass(_Source(table + b"".join(chunks)), checked, content_key=key, outs=outs).run(2)
    return model


def test_aead_layer_binds_final_flag_index_and_stream() -> None:
    """Defence in depth behind the signed table: nonce and AAD bind stream, index and final flag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edgeguard.bundle._pack import _seal_stream

    key, plain = AESGCM.generate_key(bit_length=256), bytes(range(256)) * 64
    binding = fmt.manifest_binding(b"manifest")
    chunks = _seal_stream(AESGCM(key), plain, chunk_size=1024, binding=binding, stream=fmt.STREAM_MODEL)
    assert _aead_layer(chunks, len(plain), key) == plain
    for k in range(1, 16):  # cut at a boundary: the new last chunk was sealed with final = 0
        with pytest.raises(BundleRejected, match=f"chunk {k - 1} of stream 2 failed authentication"):
            _aead_layer(chunks[:k], k * 1024, key)
    with pytest.raises(BundleRejected, match="chunk 3 of stream 2 failed authentication"):  # mid-chunk
        _aead_layer([*chunks[:3], chunks[3][:500]], 3 * 1024 + 484, key)
    with pytest.raises(BundleRejected, match="chunk 0 of stream 2 failed authentication"):  # reordered
        _aead_layer([chunks[1], chunks[0], *chunks[2:]], len(plain), key)
    with pytest.raises(BundleRejected, match="chunk 0 of stream 1 failed authentication"):  # other stream
        _aead_layer(chunks, len(plain) - 1024, key, golden_size=1024)
    other = _seal_stream(AESGCM(key), plain, chunk_size=1024, binding=b"x" * 32, stream=fmt.STREAM_MODEL)
    with pytest.raises(BundleRejected, match="chunk 5 of stream 2 failed authentication"):  # other bundle
        _aead_layer([*chunks[:5], other[5], *chunks[6:]], len(plain), key)


@pytest.mark.parametrize("threads", [1, 4])
def test_swapped_chunks(party: Party, tiny_bundle: bytes, forge: Forge, threads: int) -> None:
    limits = BundleLimits(max_open_threads=threads)
    parts = split(tiny_bundle)
    chunks = parts.model_chunks
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    as_is = tiny_bundle[: len(tiny_bundle) - sum(map(len, chunks))] + b"".join(swapped)
    assert len(as_is) == len(tiny_bundle)
    # The signed chunk table catches it, before anything is decrypted...
    with pytest.raises(BundleRejected, match="chunk 0 of stream 2 does not match its signed digest"):
        open_bundle(as_is, trust=party.trust, device_key=party.device, state_dir=None, limits=limits)
    # ...and behind a re-signed table GCM does (the index is in the nonce and AAD). Both moved chunks fail;
    # the first one is reported whatever the thread timing.
    resigned = forge(tiny_bundle, lambda p: p.with_model_chunks(swapped))
    with pytest.raises(BundleRejected, match="chunk 0 of stream 2 failed authentication"):
        open_bundle(resigned, trust=party.trust, device_key=party.device, state_dir=None, limits=limits)


def test_chunk_spliced_from_another_bundle_of_the_same_size(
    party: Party, tiny_model: bytes, forge: Forge
) -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)  # same manifest length for both
    a, b = (
        pack_bundle(
            model,
            name="t",
            version=1,
            sign_key=party.publisher,
            recipients=[party.recipient],
            chunk_size=TINY_CHUNK,
            now=now,
        )
        for model in (tiny_model, tiny_onnx(seed=9))
    )
    assert len(a) == len(b)
    chunks_a, chunks_b = split(a).model_chunks, split(b).model_chunks
    spliced = [chunks_a[0], chunks_b[1], *chunks_a[2:]]
    as_is = a[: len(a) - sum(map(len, chunks_a))] + b"".join(spliced)
    with pytest.raises(BundleRejected, match="chunk 1 of stream 2 does not match its signed digest"):
        open_bundle(as_is, trust=party.trust, device_key=party.device, state_dir=None)
    resigned = forge(a, lambda p: p.with_model_chunks(spliced))
    with pytest.raises(BundleRejected, match="chunk 1 of stream 2 failed authentication"):
        open_bundle(resigned, trust=party.trust, device_key=party.device, state_dir=None)


def test_wrapped_key_from_another_bundle_does_not_unwrap(
    party: Party, tiny_model: bytes, forge: Forge
) -> None:
    a = pack_bundle(tiny_model, name="t", version=1, sign_key=party.publisher, recipients=[party.recipient])
    b = pack_bundle(tiny_model, name="t", version=1, sign_key=party.publisher, recipients=[party.recipient])
    key_b = split(b).wrapped
    moved = forge(a, lambda p: Parts(p.manifest, key_b, p.chunks))
    # HPKE info binds the key to b's manifest: it does not unwrap for a.
    with pytest.raises(BundleRejected, match="does not unwrap"):
        open_bundle(moved, trust=party.trust, device_key=party.device, state_dir=None)


def test_wrong_device_key(party: Party, other: Party, tiny_bundle: bytes) -> None:
    with pytest.raises(BundleRejected) as exc:
        open_bundle(tiny_bundle, trust=party.trust, device_key=other.device, state_dir=None)
    assert exc.value.check == "not a recipient"


def test_unknown_signer(party: Party, other: Party, tiny_model: bytes) -> None:
    b = pack_bundle(tiny_model, name="t", version=1, sign_key=other.publisher, recipients=[party.recipient])
    assert _check(b, party) == "untrusted signer"


def test_revoked_signer_even_while_trusted(party: Party, tiny_bundle: bytes, tmp_path: Path) -> None:
    revoked = TrustStore([party.publisher.private_key.public_key()], revoked=[party.publisher.key_id])
    with pytest.raises(BundleRejected) as exc:
        open_bundle(tiny_bundle, trust=revoked, device_key=party.device, state_dir=None)
    assert exc.value.check == "revoked"
    listing = tmp_path / "revoked.txt"
    listing.write_text(f"# compromised laptop\n\n{party.publisher.key_id}  # 2026-11\n")
    store = TrustStore.from_files([party.dir / "publisher.pub"], revocation_list=listing)
    with pytest.raises(BundleRejected) as exc:
        open_bundle(tiny_bundle, trust=store, device_key=party.device, state_dir=None)
    assert exc.value.check == "revoked"


def test_rollback_below_floor(party: Party, tiny_model: bytes, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for version in (2, 3):
        b = pack_bundle(
            tiny_model, name="m", version=version, sign_key=party.publisher, recipients=[party.recipient]
        )
        open_bundle(b, trust=party.trust, device_key=party.device, state_dir=state)
    old = pack_bundle(tiny_model, name="m", version=2, sign_key=party.publisher, recipients=[party.recipient])
    assert _check(old, party, state_dir=state) == "rollback"


def test_expired(party: Party, tiny_model: bytes) -> None:
    t0 = datetime(2027, 1, 1, tzinfo=timezone.utc)
    b = pack_bundle(
        tiny_model,
        name="m",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        not_after=t0,
        now=t0 - timedelta(days=30),
    )
    open_bundle(
        b, trust=party.trust, device_key=party.device, state_dir=None, now=t0
    )  # valid up to not_after
    assert _check(b, party, now=t0 + timedelta(seconds=1)) == "expired"


def test_absurd_sizes_refused_before_allocation(party: Party, tiny_bundle: bytes, forge: Forge) -> None:
    def with_header(**fields: int) -> bytes:
        magic, ver, flags, mlen, blen, kid, digest = fmt.HEADER.unpack(tiny_bundle[: fmt.HEADER_SIZE])
        mlen, blen = fields.get("mlen", mlen), fields.get("blen", blen)
        return fmt.HEADER.pack(magic, ver, flags, mlen, blen, kid, digest) + tiny_bundle[fmt.HEADER_SIZE :]

    huge_claims = [
        with_header(blen=2**63),
        with_header(mlen=2**32 - 1),
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, payload_size=2**40), p.wrapped, p.chunks)),
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, golden_size=2**40), p.wrapped, p.chunks)),
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, chunk_size=2**30), p.wrapped, p.chunks)),
    ]
    tracemalloc.start()
    try:
        for bundle in huge_claims:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            assert _check(bundle, party) == "too large"
            assert tracemalloc.get_traced_memory()[1] - base < 256 * 1024
    finally:
        tracemalloc.stop()
    many = [f"{i:016x}" for i in range(2000)]
    forged = forge(
        tiny_bundle, lambda p: Parts(dict(p.manifest, recipient_key_ids=many), p.wrapped, p.chunks)
    )
    assert _check(forged, party) in ("malformed", "too large")
    small = BundleLimits(max_model_bytes=1000)
    assert _check(tiny_bundle, party, limits=small) == "too large"


@pytest.mark.parametrize(
    ("edit", "check"),
    [
        (lambda m: dict(m, format="pickle"), "malformed"),
        (lambda m: dict(m, name="../../etc/passwd"), "malformed"),
        (lambda m: dict(m, version=True), "malformed"),
        (lambda m: dict(m, version=-1), "malformed"),
        (lambda m: dict(m, payload_size=m["payload_size"] - 1), "malformed"),
        (lambda m: dict(m, publisher_key_id="0" * 16), "malformed"),
        (lambda m: dict(m, recipient_key_ids=[]), "malformed"),
        (lambda m: dict(m, not_after="next tuesday"), "malformed"),
        (lambda m: dict(m, not_after="2030-01-01T00:00:00"), "malformed"),
        (lambda m: dict(m, min_runtime="99.0"), "unsupported"),
        (lambda m: dict(m, surprise=1), "malformed"),
        (lambda m: dict(m, inputs=[{"name": "x", "dtype": "object", "shape": [1]}]), "malformed"),
        (lambda m: dict(m, chunk_size=16), "malformed"),
    ],
)
def test_signed_but_inconsistent_manifest(
    party: Party,
    tiny_bundle: bytes,
    forge: Forge,
    edit: Callable[[dict[str, Any]], dict[str, Any]],
    check: str,
) -> None:
    assert _check(forge(tiny_bundle, lambda p: Parts(edit(p.manifest), p.wrapped, p.chunks)), party) == check


def test_manifest_lies(party: Party, other: Party, tiny_bundle: bytes, tiny_model: bytes) -> None:
    """A signed manifest that does not describe what was encrypted (a publisher's mistake or lie)."""
    m = split(tiny_bundle).manifest
    golden = open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None).golden
    from edgeguard.bundle._golden import encode_golden

    g = encode_golden(list(golden))
    honest = seal(m, tiny_model, g, key=party.publisher, to=party.recipient)
    opened = open_bundle(honest, trust=party.trust, device_key=party.device, state_dir=None)
    assert opened.model == tiny_model
    opened.verify_payload_digest()  # the identity claim is true
    # A false plaintext digest is not an integrity hole (every byte is authenticated on its way in) but a
    # false identity: opening does not re-hash (docs/bundle.md), the explicit check finds it and wipes.
    lie = seal(dict(m, payload_sha256="0" * 64), tiny_model, g, key=party.publisher, to=party.recipient)
    opened = open_bundle(lie, trust=party.trust, device_key=party.device, state_dir=None)
    with pytest.raises(BundleRejected, match="does not match the manifest's SHA-256") as exc:
        opened.verify_payload_digest()
    assert exc.value.check == "integrity" and not any(opened.model)
    lie = seal(dict(m, golden_count=2), tiny_model, g, key=party.publisher, to=party.recipient)
    assert _check(lie, party) == "malformed"
    junk = b"not a zip file at all"
    lie = seal(m, tiny_model, junk, key=party.publisher, to=party.recipient)
    assert _check(lie, party) == "malformed"
    lie = seal(m, tiny_model, g, key=party.publisher, to=party.recipient, key_commitment="1" * 64)
    with pytest.raises(BundleRejected, match="key commitment"):
        open_bundle(lie, trust=party.trust, device_key=party.device, state_dir=None)


def test_recipients_cannot_be_given_different_content_keys(
    party: Party, other: Party, tiny_model: bytes, forge: Forge
) -> None:
    """GCM is not key-committing: a publisher could wrap another key for one recipient and craft chunks
    valid under both. The signed key commitment makes every recipient refuse any key but the committed one."""
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    both = pack_bundle(
        tiny_model,
        name="t",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient, other.recipient],
        chunk_size=TINY_CHUNK,
    )
    for p in (party, other):
        assert open_bundle(both, trust=party.trust, device_key=p.device, state_dir=None).model == tiny_model
    parts = split(both)
    raw = json.dumps(parts.manifest, separators=(",", ":")).encode()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    second = suite.encrypt(
        AESGCM.generate_key(bit_length=256), other.recipient.public_key, info=fmt.hpke_info(raw)
    )
    forged = forge(both, lambda p: Parts(p.manifest, p.wrapped[: fmt.WRAPPED_KEY_SIZE] + second, p.chunks))
    assert open_bundle(forged, trust=party.trust, device_key=party.device, state_dir=None).model == tiny_model
    with pytest.raises(BundleRejected, match="key commitment"):
        open_bundle(forged, trust=party.trust, device_key=other.device, state_dir=None)


@pytest.mark.parametrize("threads", [1, 4])
def test_failed_open_wipes_buffer(
    *,
    party: Party,
    tiny_bundle: bytes,
    tiny_model: bytes,
    forge: Forge,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    seen: list[bytearray] = []

    class Spy(bytearray):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            seen.append(self)

    import edgeguard.bundle._open as mod

    monkeypatch.setattr(mod, "bytearray", Spy, raising=False)
    chunks = split(tiny_bundle).model_chunks
    last = bytearray(chunks[-1])
    last[0] ^= 1
    bad = forge(tiny_bundle, lambda p: p.with_model_chunks([*chunks[:-1], bytes(last)]))
    with pytest.raises(BundleRejected, match=f"chunk {len(chunks) - 1} of stream 2 failed authentication"):
        open_bundle(
            bad,
            trust=party.trust,
            device_key=party.device,
            state_dir=None,
            limits=BundleLimits(max_open_threads=threads),
        )
    assert any(len(b) == len(tiny_model) for b in seen)  # the plaintext buffer was allocated and filled...
    assert all(not any(b) for b in seen)  # ...and zeroed before the error left open_bundle


def test_golden_npy_header_claiming_a_huge_array(party: Party, tiny_bundle: bytes, tiny_model: bytes) -> None:
    """A signed golden file whose .npy header declares 10^12 floats is refused before numpy allocates."""
    import io
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("0/in/x.npy", npy)
        z.writestr("0/out/y.npy", npy)
    g = buf.getvalue()
    m = split(tiny_bundle).manifest
    bad = seal(
        dict(m, golden_size=len(g), golden_count=1), tiny_model, g, key=party.publisher, to=party.recipient
    )
    tracemalloc.start()
    try:
        assert _check(bad, party) == "too large"
        assert tracemalloc.get_traced_memory()[1] < 8 * 1024 * 1024
    finally:
        tracemalloc.stop()
