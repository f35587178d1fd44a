"""Every way of changing a bundle is rejected with the right check, and nothing is handed out."""

from __future__ import annotations

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
from tests.bundle.conftest import TINY_CHUNK, Forge, Parts, Party, body_offset, seal, split, tiny_onnx


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


def _chunks(parts: Parts) -> tuple[bytes, list[bytes], int]:
    """(wrapped keys + golden stream, model chunks, model chunk size) of a bundle's body."""
    m = parts.manifest
    head = len(m["recipient_key_ids"]) * fmt.WRAPPED_KEY_SIZE + fmt.stream_size(
        m["golden_size"], m["chunk_size"]
    )
    step = m["chunk_size"] + fmt.TAG_SIZE
    model = parts.body[head:]
    return parts.body[:head], [model[i : i + step] for i in range(0, len(model), step)], step


def test_truncation_at_every_chunk_boundary_and_mid_chunk(
    party: Party, tiny_bundle: bytes, forge: Forge
) -> None:
    start = body_offset(tiny_bundle)
    head, chunks, step = _chunks(split(tiny_bundle))
    model_start = start + len(head)
    assert len(chunks) >= 8
    cuts = [model_start + k * step for k in range(len(chunks))] + [
        model_start + k * step + 100 for k in range(len(chunks))
    ]
    cuts += [start, start + 5, len(tiny_bundle) - 1]
    for cut in cuts:
        assert _check(tiny_bundle[:cut], party) == "integrity", cut
    # The AEAD layer alone (behind the signed digest) also refuses a stream cut at a chunk boundary: the
    # last remaining chunk was sealed with final=0, so it does not authenticate as the final chunk.
    import io

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edgeguard.bundle._open import _decrypt_stream, _Source
    from edgeguard.bundle._pack import _seal_stream

    key, binding, plain = AESGCM.generate_key(bit_length=256), b"b" * 32, bytes(range(256)) * 64
    sealed = io.BytesIO()
    _seal_stream(AESGCM(key), plain, chunk_size=1024, binding=binding, stream=2, out=sealed)
    whole = sealed.getvalue()

    def decrypt(data: bytes, size: int) -> bytearray:
        out = bytearray(size)
        _decrypt_stream(
            _Source(data),
            0,
            size,
            chunk_size=1024,
            key=key,
            binding=binding,
            stream=2,
            out=memoryview(out),
            scratch=None,
        )
        return out

    assert decrypt(whole, len(plain)) == plain
    for k in range(1, 16):
        with pytest.raises(BundleRejected, match=f"chunk {k - 1} of stream 2"):
            decrypt(whole[: k * (1024 + 16)], k * 1024)
    with pytest.raises(BundleRejected):  # a mid-chunk cut with a matching claimed size
        decrypt(whole[: 3 * 1040 + 500], 3 * 1024 + 484)
    with pytest.raises(BundleRejected):  # same bytes read as another stream
        out = bytearray(len(plain))
        _decrypt_stream(
            _Source(whole),
            0,
            len(plain),
            chunk_size=1024,
            key=key,
            binding=binding,
            stream=1,
            out=memoryview(out),
            scratch=None,
        )


def test_swapped_chunks(party: Party, tiny_bundle: bytes, forge: Forge) -> None:
    head, chunks, _ = _chunks(split(tiny_bundle))
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    start = body_offset(tiny_bundle)
    as_is = tiny_bundle[:start] + head + b"".join(swapped)
    assert len(as_is) == len(tiny_bundle)
    assert _check(as_is, party) == "integrity"  # signed body digest
    resigned = forge(tiny_bundle, lambda p: Parts(p.manifest, head + b"".join(swapped)))
    with pytest.raises(BundleRejected, match="chunk 0 of stream 2 failed authentication"):
        open_bundle(resigned, trust=party.trust, device_key=party.device, state_dir=None)
    # Moving a golden-stream chunk into the model stream fails too (stream id is in the nonce and AAD).
    keys_len = fmt.WRAPPED_KEY_SIZE
    golden_chunk = head[keys_len : keys_len + len(chunks[0])]
    if len(golden_chunk) == len(chunks[0]):
        mixed = forge(tiny_bundle, lambda p: Parts(p.manifest, head + golden_chunk + b"".join(chunks[1:])))
        assert _check(mixed, party) == "integrity"


def test_chunk_spliced_from_another_bundle_of_the_same_size(
    party: Party, tiny_model: bytes, forge: Forge
) -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)  # same manifest length for both
    a = pack_bundle(
        tiny_model,
        name="t",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        chunk_size=TINY_CHUNK,
        now=now,
    )
    b = pack_bundle(
        tiny_onnx(seed=9),
        name="t",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        chunk_size=TINY_CHUNK,
        now=now,
    )
    assert len(a) == len(b)
    head, chunks_a, _ = _chunks(split(a))
    _, chunks_b, _ = _chunks(split(b))
    spliced = [chunks_a[0], chunks_b[1], *chunks_a[2:]]
    start = body_offset(a)
    assert _check(a[:start] + head + b"".join(spliced), party) == "integrity"
    resigned = forge(a, lambda p: Parts(p.manifest, head + b"".join(spliced)))
    with pytest.raises(BundleRejected, match="chunk 1 of stream 2"):
        open_bundle(resigned, trust=party.trust, device_key=party.device, state_dir=None)


def test_wrapped_key_from_another_bundle_does_not_unwrap(
    party: Party, tiny_model: bytes, forge: Forge
) -> None:
    a = pack_bundle(tiny_model, name="t", version=1, sign_key=party.publisher, recipients=[party.recipient])
    b = pack_bundle(tiny_model, name="t", version=1, sign_key=party.publisher, recipients=[party.recipient])
    key_b = split(b).body[: fmt.WRAPPED_KEY_SIZE]
    moved = forge(a, lambda p: Parts(p.manifest, key_b + p.body[fmt.WRAPPED_KEY_SIZE :]))
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
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, payload_size=2**40), p.body)),
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, golden_size=2**40), p.body)),
        forge(tiny_bundle, lambda p: Parts(dict(p.manifest, chunk_size=2**30), p.body)),
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
    forged = forge(tiny_bundle, lambda p: Parts(dict(p.manifest, recipient_key_ids=many), p.body))
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
    assert _check(forge(tiny_bundle, lambda p: Parts(edit(p.manifest), p.body)), party) == check


def test_manifest_lies_found_after_decryption(party: Party, tiny_bundle: bytes, tiny_model: bytes) -> None:
    """A signed manifest whose digest or golden count does not match what was encrypted."""
    m = split(tiny_bundle).manifest
    golden = open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None).golden
    from edgeguard.bundle._golden import encode_golden

    g = encode_golden(list(golden))
    honest = seal(dict(m, golden_size=len(g)), tiny_model, g, key=party.publisher, to=party.recipient)
    assert open_bundle(honest, trust=party.trust, device_key=party.device, state_dir=None).model == tiny_model
    lie = seal(
        dict(m, golden_size=len(g), payload_sha256="0" * 64),
        tiny_model,
        g,
        key=party.publisher,
        to=party.recipient,
    )
    with pytest.raises(BundleRejected, match="does not match the manifest's SHA-256"):
        open_bundle(lie, trust=party.trust, device_key=party.device, state_dir=None)
    lie = seal(
        dict(m, golden_size=len(g), golden_count=2), tiny_model, g, key=party.publisher, to=party.recipient
    )
    assert _check(lie, party) == "malformed"
    lie = seal(m, tiny_model, g, key=party.publisher, to=party.recipient, golden_sha256="1" * 64)
    with pytest.raises(BundleRejected, match="golden vectors do not match"):
        open_bundle(lie, trust=party.trust, device_key=party.device, state_dir=None)
    junk = b"not a zip file at all"
    lie = seal(dict(m, golden_size=len(junk)), tiny_model, junk, key=party.publisher, to=party.recipient)
    assert _check(lie, party) == "malformed"


def test_failed_open_wipes_buffer(
    party: Party, tiny_bundle: bytes, tiny_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytearray] = []

    class Spy(bytearray):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            seen.append(self)

    import edgeguard.bundle._open as mod

    monkeypatch.setattr(mod, "bytearray", Spy, raising=False)
    m = split(tiny_bundle).manifest
    bad = seal(
        dict(m, golden_size=0, golden_count=0, payload_sha256="0" * 64),
        tiny_model,
        b"",
        key=party.publisher,
        to=party.recipient,
    )
    assert _check(bad, party) == "integrity"
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


def test_file_rewritten_between_reads_is_refused(
    party: Party, tiny_bundle: bytes, forge: Forge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone swaps the file for another validly signed bundle right after its header was parsed."""
    from edgeguard.bundle import _open

    other = forge(tiny_bundle, lambda p: Parts(p.manifest, p.body[:-1] + bytes([p.body[-1] ^ 1])))
    path = tmp_path / "b.egm"
    path.write_bytes(tiny_bundle)
    real_view = _open._Source.view

    def view(self: _open._Source, offset: int, n: int, scratch: bytearray | None = None) -> memoryview:
        out = real_view(self, offset, n, scratch)
        if offset == 0 and n == fmt.HEADER_SIZE:
            path.write_bytes(other)  # same length, same manifest, different signed body digest
        return out

    monkeypatch.setattr(_open._Source, "view", view)
    with pytest.raises(BundleRejected, match="changed while it was being read"):
        open_bundle(path, trust=party.trust, device_key=party.device, state_dir=None)
