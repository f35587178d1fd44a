"""Keys, a small generated model (for exhaustive tamper tests) and a helper that re-signs forged bundles."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle import _format as fmt
from edgeguard.bundle import pack_bundle
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
    manifest: dict[str, Any]
    body: bytes


def split(bundle: bytes) -> Parts:
    manifest_len = int.from_bytes(bundle[12:16], "big")
    start = fmt.HEADER_SIZE
    manifest = json.loads(bundle[start : start + manifest_len])
    return Parts(manifest, bundle[start + manifest_len + fmt.SIGNATURE_SIZE :])


def body_offset(bundle: bytes) -> int:
    return fmt.HEADER_SIZE + int.from_bytes(bundle[12:16], "big") + fmt.SIGNATURE_SIZE


def resign(manifest: dict[str, Any], body: bytes, key: PublisherKey) -> bytes:
    """Build a correctly signed bundle around an arbitrary manifest and body: what an attacker holding a
    trusted publisher key could do. Used to reach the layers behind the signature (AEAD, layout, limits)."""
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    header = fmt.HEADER.pack(
        fmt.MAGIC, 1, 0, len(raw), len(body), bytes.fromhex(key.key_id), hashlib.sha256(body).digest()
    )
    return header + raw + key.private_key.sign(header + raw) + body


Forge = Callable[[bytes, Callable[[Parts], Parts]], bytes]


@pytest.fixture
def forge(party: Party) -> Forge:
    def _forge(bundle: bytes, edit: Callable[[Parts], Parts]) -> bytes:
        parts = edit(split(bundle))
        return resign(parts.manifest, parts.body, party.publisher)

    return _forge


def seal(
    manifest: dict[str, Any],
    model: bytes,
    golden: bytes,
    *,
    key: PublisherKey,
    to: RecipientKey,
    golden_sha256: str | None = None,
) -> bytes:
    """Encrypt and sign exactly what it is given (a publisher that lies in its own manifest): reaches the
    checks that only run after decryption (plaintext digest, golden vectors). ``golden_size`` is set from
    ``golden``; ``golden_sha256`` too unless given (a lie on purpose)."""
    import io

    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edgeguard.bundle._pack import _seal_stream

    manifest = dict(manifest, golden_size=len(golden))
    manifest["golden_sha256"] = golden_sha256 or (hashlib.sha256(golden).hexdigest() if golden else "")
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    content_key = AESGCM.generate_key(bit_length=256)
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    body = io.BytesIO()
    body.write(suite.encrypt(content_key, to.public_key, info=fmt.hpke_info(raw)))
    aead, binding = AESGCM(content_key), fmt.manifest_binding(raw)
    for stream, data in ((fmt.STREAM_GOLDEN, golden), (fmt.STREAM_MODEL, model)):
        _seal_stream(aead, data, chunk_size=manifest["chunk_size"], binding=binding, stream=stream, out=body)
    return resign(manifest, body.getvalue(), key)
