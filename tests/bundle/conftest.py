"""Keys, a small generated model (for exhaustive tamper tests) and a helper that re-signs forged bundles."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle import _format as fmt
from edgeguard.bundle import pack_bundle
from edgeguard.bundle._pack import assemble
from edgeguard.keys import (
    DeviceKey,
    PublisherKey,
    RecipientKey,
    TrustStore,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
)


@dataclass(frozen=True)
class Party:
    dir: Path
    publisher: PublisherKey
    device: DeviceKey
    recipient: RecipientKey
    trust: TrustStore


def make_party(root: Path) -> Party:
    generate_keypair("publisher", root)
    generate_keypair("device", root)
    return Party(
        dir=root,
        publisher=load_publisher_key(root / "publisher.key"),
        device=load_device_key(root / "device.key"),
        recipient=load_recipient_key(root / "device.pub"),
        trust=TrustStore([load_trusted_key(root / "publisher.pub")]),
    )


@pytest.fixture(scope="session")
def party(tmp_path_factory: pytest.TempPathFactory) -> Party:
    return make_party(tmp_path_factory.mktemp("party"))


@pytest.fixture(scope="session")
def other(tmp_path_factory: pytest.TempPathFactory) -> Party:
    return make_party(tmp_path_factory.mktemp("other"))


def tiny_onnx(seed: int = 0, width: int = 96) -> bytes:
    """y = x @ W + b with random weights: a real, loadable ONNX model of ~37 kB (several 4 kB chunks)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((width,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture(scope="session")
def tiny_model() -> bytes:
    return tiny_onnx()


TINY_CHUNK = 4096


@pytest.fixture(scope="session")
def tiny_bundle(party: Party, tiny_model: bytes) -> bytes:
    return pack_bundle(
        tiny_model,
        name="tiny",
        version=3,
        sign_key=party.publisher,
        recipients=[party.recipient],
        chunk_size=TINY_CHUNK,
        golden=[{"in": {"x": np.ones((1, 96), np.float32)}, "out": {}}],
    )


@dataclass(frozen=True)
class Parts:
    """A bundle taken apart: its manifest, the wrapped keys and the sealed chunks (golden, then model)."""

    manifest: dict[str, Any]
    wrapped: bytes
    chunks: list[bytes]

    @property
    def golden_chunks(self) -> int:
        return fmt.chunk_count(self.manifest["golden_size"], self.manifest["chunk_size"])

    @property
    def model_chunks(self) -> list[bytes]:
        return self.chunks[self.golden_chunks :]

    def with_model_chunks(self, chunks: list[bytes], **manifest: Any) -> Parts:
        return Parts(
            dict(self.manifest, **manifest), self.wrapped, self.chunks[: self.golden_chunks] + chunks
        )


def layout_of(manifest: dict[str, Any]) -> fmt.Layout:
    return fmt.Layout(
        recipients=len(manifest["recipient_key_ids"]),
        chunk_size=manifest["chunk_size"],
        golden_size=manifest["golden_size"],
        model_size=manifest["payload_size"],
    )


def split(bundle: bytes) -> Parts:
    start = body_offset(bundle)
    manifest = json.loads(bundle[fmt.HEADER_SIZE : start - fmt.SIGNATURE_SIZE])
    layout = layout_of(manifest)
    chunks = []
    for k in range(layout.chunks):
        c = layout.chunk(k)
        chunks.append(bundle[start + c.body_offset : start + c.body_offset + c.plain_size + fmt.TAG_SIZE])
    return Parts(manifest, bundle[start : start + layout.table_offset], chunks)


def body_offset(bundle: bytes) -> int:
    return fmt.HEADER_SIZE + int.from_bytes(bundle[12:16], "big") + fmt.SIGNATURE_SIZE


def index_digest(bundle: bytes) -> bytes:
    return bytes(fmt.HEADER.unpack(bundle[: fmt.HEADER_SIZE])[6])


def resign(parts: Parts, key: PublisherKey) -> bytes:
    """Build a correctly signed bundle (chunk table and index digest recomputed) around arbitrary parts: what
    an attacker holding a trusted publisher key but not the content key could do. Used to reach the layers
    behind the signature (AEAD, key commitment, layout, limits)."""
    raw = json.dumps(parts.manifest, separators=(",", ":")).encode()
    suite = parts.manifest.get("suite", fmt.DEFAULT_SUITE)
    if not isinstance(suite, str) or suite not in fmt.SUITES:
        suite = fmt.DEFAULT_SUITE  # an unknown or ill-typed suite is hashed as the default
    return assemble(raw, [parts.wrapped], parts.chunks, key, suite=suite)


Forge = Callable[[bytes, Callable[[Parts], Parts]], bytes]


@pytest.fixture
def forge(party: Party) -> Forge:
    def _forge(bundle: bytes, edit: Callable[[Parts], Parts]) -> bytes:
        return resign(edit(split(bundle)), party.publisher)

    return _forge


def seal(
    manifest: dict[str, Any],
    model: bytes,
    golden: bytes,
    *,
    key: PublisherKey,
    to: RecipientKey,
    key_commitment: str | None = None,
    aead: str = "aes256gcm",
) -> bytes:
    """Encrypt and sign exactly what it is given (a publisher that lies in its own manifest): reaches the
    checks that only run during or after decryption (key commitment, plaintext digest, golden vectors).
    ``golden_size`` and ``payload_size`` are set from the data; ``key_commitment`` too unless given.
    ``aead`` seals the chunks whatever suite the manifest names; the digests follow the manifest's suite."""
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from edgeguard.bundle._pack import _seal_stream

    content_key = AESGCM.generate_key(bit_length=256)
    manifest = dict(manifest, golden_size=len(golden), payload_size=len(model))
    manifest["key_commitment"] = key_commitment or fmt.key_commitment(content_key)
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    wrapped = suite.encrypt(content_key, to.public_key, info=fmt.hpke_info(raw))
    cipher = ChaCha20Poly1305(content_key) if aead == "chacha20poly1305" else AESGCM(content_key)
    binding = fmt.manifest_binding(raw)
    chunks = []
    for stream, data in ((fmt.STREAM_GOLDEN, golden), (fmt.STREAM_MODEL, model)):
        size = manifest["chunk_size"]
        chunks += _seal_stream(cipher, data, chunk_size=size, binding=binding, stream=stream)
    return assemble(raw, [wrapped], chunks, key, suite=manifest.get("suite", fmt.DEFAULT_SUITE))
