"""Cipher suites: AES-256-GCM + SHA-256 (default), ChaCha20-Poly1305 + BLAKE2b and AES-256-GCM + BLAKE3,
chosen at pack time, recorded in the signed manifest, read by the one parser; bundles from before suites keep
opening."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from edgeguard.bundle import _format as fmt
from edgeguard.bundle import inspect_bundle, open_bundle, pack_bundle, verify_bundle
from edgeguard.bundle._pack import resolve_suite
from edgeguard.errors import BundleRejected, ConfigError
from edgeguard.keys import TrustStore, load_device_key, load_trusted_key

from .conftest import TINY_CHUNK, Forge, Parts, Party, body_offset, seal, split
from .test_cli import eg, rejected

CHACHA = "chacha20poly1305-blake2b"
BLAKE3 = "aes256gcm-blake3"
FIXTURE = Path(__file__).parent / "fixtures" / "format2"


def _pack(party: Party, model: bytes, suite: str, **kw: Any) -> bytes:
    return pack_bundle(
        model,
        name="tiny",
        version=3,
        sign_key=party.publisher,
        recipients=[party.recipient],
        chunk_size=TINY_CHUNK,
        golden=[{"in": {"x": np.ones((1, 96), np.float32)}, "out": {}}],
        suite=suite,
        **kw,
    )


@pytest.fixture(scope="module")
def chacha_bundle(party: Party, tiny_model: bytes) -> bytes:
    return _pack(party, tiny_model, CHACHA)


@pytest.fixture(scope="module")
def sealed(party: Party, tiny_model: bytes, chacha_bundle: bytes) -> dict[str, bytes]:
    return {CHACHA: chacha_bundle, BLAKE3: _pack(party, tiny_model, BLAKE3)}


def _rejected(bundle: bytes, party: Party) -> BundleRejected:
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bundle, trust=party.trust, device_key=party.device, state_dir=None)
    assert "\n" not in str(exc.value)
    return exc.value


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("from_file", [False, True])
@pytest.mark.parametrize("suite", [CHACHA, BLAKE3])
def test_bundle_of_each_suite_opens_and_records_its_suite(
    party: Party,
    sealed: dict[str, bytes],
    tiny_model: bytes,
    *,
    tmp_path: Path,
    threads: int,
    from_file: bool,
    suite: str,
) -> None:
    source: Path | bytes = sealed[suite]
    if from_file:
        source = tmp_path / "c.egm"
        source.write_bytes(sealed[suite])
    limits = fmt.BundleLimits(max_open_threads=threads)
    opened = open_bundle(source, trust=party.trust, device_key=party.device, state_dir=None, limits=limits)
    assert opened.model == tiny_model and opened.manifest.suite == suite
    assert len(opened.golden) == 1 and set(opened.golden[0].inputs) == {"x"}
    assert verify_bundle(source, trust=party.trust, limits=limits).manifest.suite == suite
    assert split(sealed[suite]).manifest["suite"] == suite  # in the signed manifest
    assert inspect_bundle(sealed[suite])["manifest"]["suite"] == suite  # type: ignore[index]


def _digest(suite: str, data: bytes) -> bytes:
    if suite == CHACHA:
        return hashlib.blake2b(data, digest_size=32).digest()
    return blake3.blake3(data).digest()


@pytest.mark.parametrize("suite", [CHACHA, BLAKE3])
def test_chunks_and_digests_are_what_the_suite_says(
    party: Party, sealed: dict[str, bytes], tiny_model: bytes, suite: str
) -> None:
    """The chunk table holds the suite's 32-byte digest of each chunk and the header that of the index
    (BLAKE2b-256 / BLAKE3), checked independently of the opener."""
    bundle = sealed[suite]
    parts = split(bundle)
    start = body_offset(bundle)
    layout = fmt.Layout(
        recipients=1,
        chunk_size=TINY_CHUNK,
        golden_size=parts.manifest["golden_size"],
        model_size=len(tiny_model),
    )
    index = bundle[start : start + layout.index_len]
    table = index[layout.table_offset :]
    for k, chunk in enumerate(parts.chunks):
        assert table[k * 32 : (k + 1) * 32] == _digest(suite, chunk)
    assert fmt.HEADER.unpack(bundle[: fmt.HEADER_SIZE])[6] == _digest(suite, index)
    assert table[:32] != hashlib.sha256(parts.chunks[0]).digest()


def test_default_suite_writes_the_format_before_suites(party: Party, tiny_model: bytes) -> None:
    """The default is left out of the manifest: runtimes that predate suites read such a bundle as before."""
    data = _pack(party, tiny_model, fmt.DEFAULT_SUITE)
    assert "suite" not in split(data).manifest
    opened = open_bundle(data, trust=party.trust, device_key=party.device, state_dir=None)
    assert opened.manifest.suite == fmt.DEFAULT_SUITE and opened.model == tiny_model


def test_format2_bundle_from_before_suites_still_opens(tmp_path: Path) -> None:
    """A bundle packed by the code before suites existed (committed fixture, test keys only)."""
    shutil.copy(FIXTURE / "device.key", tmp_path / "device.key")
    (tmp_path / "device.key").chmod(0o600)
    trust = TrustStore([load_trusted_key(FIXTURE / "publisher.pub")])
    device = load_device_key(tmp_path / "device.key")
    data = (FIXTURE / "legacy.egm").read_bytes()
    assert fmt.HEADER.unpack(data[: fmt.HEADER_SIZE])[1] == 2 and b'"suite"' not in data[: body_offset(data)]
    for source in (data, FIXTURE / "legacy.egm"):
        opened = open_bundle(source, trust=trust, device_key=device, state_dir=None)
        assert opened.manifest.suite == fmt.DEFAULT_SUITE and opened.manifest.name == "legacy"
        assert hashlib.sha256(opened.model).hexdigest() == (FIXTURE / "model.sha256").read_text().strip()
        opened.verify_payload_digest()
        assert len(opened.golden) == 1


def _swap_suite(bundle: bytes, suite: str | None) -> bytes:
    """Rewrite the manifest's suite field in place (new length in the header), keeping the signature: what
    an attacker without the publisher key can do to downgrade or confuse the suite."""
    start = body_offset(bundle)
    m = json.loads(bundle[fmt.HEADER_SIZE : start - fmt.SIGNATURE_SIZE])
    if suite is None:
        m.pop("suite", None)
    else:
        m["suite"] = suite
    raw = json.dumps(m, separators=(",", ":"), sort_keys=True).encode()
    magic, ver, flags, _, body_len, kid, digest = fmt.HEADER.unpack(bundle[: fmt.HEADER_SIZE])
    header = fmt.HEADER.pack(magic, ver, flags, len(raw), body_len, kid, digest)
    return header + raw + bundle[start - fmt.SIGNATURE_SIZE :]


@pytest.mark.parametrize(
    "direction", ["chacha->aes (field removed)", "chacha->aes (field set)", "aes->chacha"]
)
def test_swapping_the_suite_field_fails_the_signature(
    party: Party, chacha_bundle: bytes, tiny_bundle: bytes, direction: str
) -> None:
    if direction.startswith("chacha"):
        forged = _swap_suite(chacha_bundle, None if "removed" in direction else fmt.DEFAULT_SUITE)
    else:
        forged = _swap_suite(tiny_bundle, CHACHA)
    assert _rejected(forged, party).check == "signature"
    with pytest.raises(BundleRejected, match="signature"):
        verify_bundle(forged, trust=party.trust)


@pytest.mark.parametrize(
    ("named", "sealed_with"),
    [(fmt.DEFAULT_SUITE, "chacha20poly1305"), (CHACHA, "aes256gcm"), (BLAKE3, "chacha20poly1305")],
)
def test_suite_confusion_by_the_publisher_fails_integrity(
    party: Party, tiny_bundle: bytes, tiny_model: bytes, named: str, sealed_with: str
) -> None:
    """Even a correctly signed bundle whose manifest names one suite over chunks sealed with the other's
    AEAD (digests consistent with the named suite) never yields plaintext: every chunk's tag fails."""
    m = {k: v for k, v in split(tiny_bundle).manifest.items() if k != "suite"} | {"golden_count": 0}
    if named != fmt.DEFAULT_SUITE:
        m["suite"] = named
    forged = seal(m, tiny_model, b"", key=party.publisher, to=party.recipient, aead=sealed_with)
    assert verify_bundle(forged, trust=party.trust).manifest.suite == named  # signature and digests agree
    exc = _rejected(forged, party)
    assert exc.check == "integrity" and "failed authentication" in str(exc)


@pytest.mark.parametrize("suite", ["aes128gcm-md5", "AES256GCM-SHA256", ""])
def test_unknown_suite_is_unsupported(party: Party, tiny_bundle: bytes, forge: Forge, suite: str) -> None:
    forged = forge(tiny_bundle, lambda p: Parts({**p.manifest, "suite": suite}, p.wrapped, p.chunks))
    exc = _rejected(forged, party)
    assert (
        exc.check == "unsupported" and "cipher suite" in str(exc) and "chacha20poly1305-blake2b" in str(exc)
    )


@pytest.mark.parametrize("value", [7, None, ["aes256gcm-sha256"], "x" * 65])
def test_suite_field_of_the_wrong_type_is_malformed(
    party: Party, tiny_bundle: bytes, forge: Forge, value: object
) -> None:
    forged = forge(tiny_bundle, lambda p: Parts({**p.manifest, "suite": value}, p.wrapped, p.chunks))
    assert _rejected(forged, party).check == "malformed"


def test_tampered_chacha_chunks_are_refused_and_wiped(
    party: Party, chacha_bundle: bytes, forge: Forge
) -> None:
    flipped = bytearray(chacha_bundle)
    flipped[-100] ^= 1
    assert _rejected(bytes(flipped), party).check == "integrity"
    # Chunks swapped by someone holding the publisher key (table recomputed): ChaCha's nonce and AAD bind
    # each chunk's position, exactly as GCM's do.
    swapped = forge(
        chacha_bundle,
        lambda p: p.with_model_chunks([p.model_chunks[1], p.model_chunks[0], *p.model_chunks[2:]]),
    )
    exc = _rejected(swapped, party)
    assert exc.check == "integrity" and "failed authentication" in str(exc)


def test_resolve_suite() -> None:
    assert resolve_suite("auto") == fmt.DEFAULT_SUITE  # nothing known about the recipients
    assert resolve_suite("auto", ["generic-x86_64", "raspberry-pi-5", "my-own-board"]) == fmt.DEFAULT_SUITE
    assert resolve_suite("auto", ["raspberry-pi-5", "raspberry-pi-4"]) == CHACHA  # the slowest board decides
    assert resolve_suite(CHACHA) == CHACHA and resolve_suite(fmt.DEFAULT_SUITE) == fmt.DEFAULT_SUITE
    with pytest.raises(ConfigError, match="unknown cipher suite 'rot13'"):
        resolve_suite("rot13")


def test_cli_pack_suite_auto_from_profiles(tmp_path: Path, tiny_model: bytes) -> None:
    (tmp_path / "tiny.onnx").write_bytes(tiny_model)
    for kind, where in (("publisher", "pub"), ("device", "dev")):
        assert eg("keygen", kind, "--out", where, cwd=tmp_path).code == 0
    base = [
        "pack",
        "tiny.onnx",
        "--name",
        "tiny",
        "--version",
        1,
        "--sign-key",
        "pub/publisher.key",
        "--recipient",
        "dev/device.pub",
    ]
    for extra, out, suite in (
        ([], "default.egm", fmt.DEFAULT_SUITE),
        (["--suite", "auto", "--profile", "raspberry-pi-4"], "pi4.egm", CHACHA),
        (["--suite", "auto", "--profile", "jetson-orin"], "orin.egm", fmt.DEFAULT_SUITE),
        (["--suite", CHACHA], "chacha.egm", CHACHA),
    ):
        r = eg(*base, *extra, "-o", out, cwd=tmp_path)
        assert r.code == 0, r
        assert (
            json.loads(eg("inspect", out, cwd=tmp_path).out)["manifest"].get("suite", fmt.DEFAULT_SUITE)
            == suite
        )
        r = eg("verify", out, "--trust", "pub/publisher.pub", "--device-key", "dev/device.key", cwd=tmp_path)
        assert r.code == 0 and "ok: tiny v1" in r.out, r
    r = eg(*base, "--suite", "rot13", "-o", "x.egm", cwd=tmp_path)
    assert r.code == 2 and "invalid choice: 'rot13'" in r.err and not (tmp_path / "x.egm").exists()
    # A suite swapped on the way: one line naming the check, exit 3.
    (tmp_path / "swapped.egm").write_bytes(_swap_suite((tmp_path / "chacha.egm").read_bytes(), None))
    rejected(eg("verify", "swapped.egm", "--trust", "pub/publisher.pub", cwd=tmp_path), "signature")


class _ChaChaWithoutDecryptInto:
    """ChaCha20Poly1305 as cryptography releases without ``decrypt_into`` have it."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._aead = ChaCha20Poly1305(key)

    def decrypt(self, nonce: bytes, data: Any, aad: bytes) -> bytes:
        return self._aead.decrypt(nonce, data, aad)


@pytest.mark.parametrize("into", [True, False], ids=["decrypt_into", "decrypt+copy"])
@pytest.mark.parametrize("threads", [1, 4])
def test_failed_chacha_open_wipes_what_it_decrypted(
    *,
    party: Party,
    chacha_bundle: bytes,
    tiny_model: bytes,
    forge: Forge,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
    into: bool,
) -> None:
    """The earlier chunks are decrypted into the plaintext buffer before the last one fails its tag: the
    buffer is zeroed before the error leaves open_bundle, as with AES-GCM; with and without
    ``decrypt_into`` (older cryptography), and the honest bundle opens both ways."""
    import edgeguard.bundle._open as mod

    if not into:
        monkeypatch.setattr(mod, "ChaCha20Poly1305", _ChaChaWithoutDecryptInto)
    limits = fmt.BundleLimits(max_open_threads=threads)
    good = open_bundle(
        chacha_bundle, trust=party.trust, device_key=party.device, state_dir=None, limits=limits
    )
    assert good.model == tiny_model
    seen: list[bytearray] = []

    class Spy(bytearray):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            seen.append(self)

    monkeypatch.setattr(mod, "bytearray", Spy, raising=False)
    chunks = split(chacha_bundle).model_chunks
    last = bytearray(chunks[-1])
    last[0] ^= 1
    bad = forge(chacha_bundle, lambda p: p.with_model_chunks([*chunks[:-1], bytes(last)]))
    with pytest.raises(BundleRejected, match=f"chunk {len(chunks) - 1} of stream 2 failed authentication"):
        open_bundle(
            bad,
            trust=party.trust,
            device_key=party.device,
            state_dir=None,
            limits=fmt.BundleLimits(max_open_threads=threads),
        )
    assert any(len(b) == len(tiny_model) for b in seen)  # the plaintext buffer was allocated and filled...
    assert all(not any(b) for b in seen)  # ...and zeroed before the error left open_bundle
