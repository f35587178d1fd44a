"""One harness per untrusted parser: what it feeds, which error is the documented refusal, what it checks.

A harness's ``one_input(data)`` returns normally for every input the parser handled as documented: accepted,
or refused with its own error family. Anything else escaping it is a finding: another exception type (a
crash), ``MemoryError`` (an allocation over the address-space bound the runner sets) or an ``AssertionError``
from an invariant the harness checks on top (a mutated bundle never opens, a decoder's buffer stays within its
bound, a frame round-trips, nothing on another topic reaches the input). Hangs are caught by the runner's
per-input time limit.

Limits are set small on purpose: the largest legitimate allocation for one input is then about a megabyte, so
the runner's bound (``Harness.headroom_mb`` over what set-up left mapped) is hit only by a size that was taken
from the input and trusted before it was checked. Keys are derived from fixed seeds, so a corpus saved by one
run still gets past the signature in the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.client import MQTTMessage

from edgeguard.bundle import BundleLimits, GoldenSample, TensorSpec, inspect_bundle, open_bundle, pack_bundle
from edgeguard.bundle import _format as fmt
from edgeguard.bundle._golden import decode_golden, encode_golden
from edgeguard.errors import BundleRejected, ConfigError, InputRejected
from edgeguard.keys import DeviceKey, PublisherKey, RecipientKey, TrustStore, public_key_id
from edgeguard.link import LinkConfig, MqttLink
from edgeguard.outbox import Outbox
from edgeguard.sources import BodyLimits, MqttInputSource, TokenStore, parse_body, parse_sensor_frame
from edgeguard.sources.framing import FrameDecoder, cobs_decode, cobs_encode, encode_frame

from .base import Harness, Target

__all__ = ["TARGETS", "target"]

# Every time-dependent check (expiry) sees this instant, so a corpus entry behaves the same in every run.
_NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


# --- bundle bytes

_BUNDLE_LIMITS = BundleLimits(
    # max_open_threads=1: no helper-thread stacks inside the address-space bound, and deterministic runs.
    max_manifest_bytes=64 * 1024,
    max_model_bytes=1 << 20,
    max_golden_bytes=1 << 16,
    max_open_threads=1,
)


@dataclass(frozen=True)
class _Party:
    publisher: PublisherKey
    device: DeviceKey
    trust: TrustStore


def _fixed_key(label: str) -> bytes:
    return hashlib.sha256(b"edgeguard fuzz " + label.encode()).digest()


def _party() -> _Party:
    sign = Ed25519PrivateKey.from_private_bytes(_fixed_key("publisher"))
    dev = X25519PrivateKey.from_private_bytes(_fixed_key("device"))
    # Another trusted key and a revoked one: the signer lookup has every branch to take.
    other = Ed25519PrivateKey.from_private_bytes(_fixed_key("other")).public_key()
    revoked = Ed25519PrivateKey.from_private_bytes(_fixed_key("revoked")).public_key()
    trust = TrustStore([sign.public_key(), other, revoked], revoked=[public_key_id(revoked)])
    return _Party(
        PublisherKey(sign, public_key_id(sign.public_key())),
        DeviceKey(dev, public_key_id(dev.public_key())),
        trust,
    )


def _tiny_onnx(width: int) -> bytes:
    """y = x @ W + b: a real ONNX model of a few hundred bytes (onnx is in the dev extra)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(width)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((width,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _seed_bundles(p: _Party) -> tuple[tuple[bytes, ...], frozenset[bytes]]:
    """Real bundles from the pack code (so the fuzzer starts past the magic) and their models' digests."""
    me = RecipientKey(p.device.private_key.public_key(), p.device.key_id)
    someone = X25519PrivateKey.from_private_bytes(_fixed_key("someone")).public_key()
    models = {w: _tiny_onnx(w) for w in (4, 20)}
    x4, x20 = np.ones((1, 4), np.float32), np.ones((1, 20), np.float32)
    seeds = (
        # 1 KiB chunks, golden outputs from a reference run.
        pack_bundle(models[20], name="fuzz", version=3, sign_key=p.publisher, recipients=[me],
                    chunk_size=1024, golden=[{"in": {"x": x20}, "out": {}}], now=_NOW),
        # One chunk, an expiry, a description, two recipients, no golden vectors.
        pack_bundle(models[4], name="fuzz-b", version=1, sign_key=p.publisher,
                    recipients=[RecipientKey(someone, public_key_id(someone)), me], chunk_size=4096,
                    not_after=datetime(2031, 1, 1, tzinfo=timezone.utc), meta={"description": "seed"},
                    now=_NOW),
        pack_bundle(models[4], name="fuzz", version=2, sign_key=p.publisher, recipients=[me], chunk_size=1024,
                    golden=[{"in": {"x": x4}, "out": {"y": x4}}], now=_NOW),
    )  # fmt: skip
    return seeds, frozenset(hashlib.sha256(m).digest() for m in models.values())


def _bundle(_scratch: Path) -> Harness:
    p = _party()
    seeds, plaintexts = _seed_bundles(p)

    def one_input(data: bytes) -> None:
        try:
            opened = open_bundle(
                data, trust=p.trust, device_key=p.device, state_dir=None, now=_NOW, limits=_BUNDLE_LIMITS
            )
        except BundleRejected:
            pass
        else:
            # Every byte is bound by the signature and the fuzzer cannot sign: only what this publisher key
            # really sealed may open. Anything else opening is a verification bypass.
            digest = hashlib.sha256(opened.model).digest()
            opened.wipe()
            assert digest in plaintexts, "a bundle the publisher never sealed was opened"
        with contextlib.suppress(BundleRejected):
            inspect_bundle(data, limits=_BUNDLE_LIMITS)

    return Harness(one_input, seeds, max_len=max(map(len, seeds)) + 1024)


def _manifest_of(bundle: bytes) -> bytes:
    return bundle[fmt.HEADER_SIZE : fmt.HEADER_SIZE + int.from_bytes(bundle[12:16], "big")]


def _bundle_manifest(_scratch: Path) -> Harness:
    """Behind the signature: the input is a manifest, signed with the trusted key around a real body (what a
    stolen or careless publisher key could sign). Reaches the manifest schema, the layout against the header,
    expiry, recipient, the index digest and the key unwrap."""
    p = _party()
    seeds, _ = _seed_bundles(p)
    body = seeds[0][fmt.HEADER_SIZE + len(_manifest_of(seeds[0])) + fmt.SIGNATURE_SIZE :]
    index_sha = bytes(fmt.HEADER.unpack(seeds[0][: fmt.HEADER_SIZE])[6])
    kid = bytes.fromhex(p.publisher.key_id)

    def one_input(data: bytes) -> None:
        signed = (
            fmt.HEADER.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(data), len(body), kid, index_sha) + data
        )
        bundle = signed + p.publisher.private_key.sign(signed) + body
        with contextlib.suppress(BundleRejected):
            open_bundle(
                bundle, trust=p.trust, device_key=p.device, state_dir=None, now=_NOW, limits=_BUNDLE_LIMITS
            ).wipe()

    manifests = tuple(_manifest_of(s) for s in seeds)
    return Harness(one_input, manifests, max_len=max(map(len, manifests)) + 1024)


def _golden(_scratch: Path) -> Harness:
    """The golden-vector archive (an .npz, optionally deflated) that a bundle carries behind its signature and
    encryption: only a publisher key can put bytes here, but the decoder still must not trust its sizes."""
    p = _party()
    seeds, _ = _seed_bundles(p)
    opened = open_bundle(seeds[0], trust=p.trust, device_key=p.device, state_dir=None, now=_NOW)
    manifest = opened.manifest
    opened.wipe()
    x = np.ones((1, 20), np.float32)
    samples = [GoldenSample(inputs={"x": x}, outputs={"y": x * 2})]
    plain = encode_golden(samples)
    deflated = io.BytesIO()
    arrays: dict[str, Any] = {"0/in/x": x, "0/out/y": x}
    np.savez_compressed(deflated, **arrays)
    one = dataclasses.replace(manifest, golden_count=1)

    def one_input(data: bytes) -> None:
        with contextlib.suppress(BundleRejected):
            decode_golden(bytearray(data), one, _BUNDLE_LIMITS)

    return Harness(one_input, (plain, deflated.getvalue()), max_len=max(len(plain), deflated.tell()) + 1024)


# --- request bodies

_BODY_LIMITS = BodyLimits(max_body_bytes=1 << 20, max_elements=1 << 16)
_SPECS: tuple[tuple[TensorSpec, ...], ...] = (
    (TensorSpec(name="x", dtype="float32", shape=(1, 4)),),
    (
        TensorSpec(name="x", dtype="float32", shape=(None, 4)),
        TensorSpec(name="ids", dtype="int64", shape=(3,)),
    ),
    (TensorSpec(name="q", dtype="uint8", shape=(2, 2)),),
)
_CONTENT_TYPES = (
    "",
    "application/json",
    "application/x-npy",
    "application/octet-stream",
    "image/png",
    "application/json; charset=utf-8",
    "text/plain",
    "APPLICATION/NPY",
)
_INPUT_NAMES = (None, "x", "ids", "nope")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _body_seeds() -> tuple[bytes, ...]:
    """(content type index, specs/name index, body): the first two bytes choose how the body is presented."""
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8ffff3f0005fe02"
        "fea7d5a1d20000000049454e44ae426082"
    )
    bodies = [
        (1, 0, {"inputs": {"x": [[1, 2, 3, 4]]}, "id": "a-1"}),
        (
            1,
            1,
            {"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, 4], "dtype": "float32"}, "ids": [1, 2, 3]}},
        ),
        (0, 2, {"inputs": {"q": [[1, 2], [3, 255]]}}),
        (5, 0, {"image_b64": "aGVsbG8=", "id": "img"}),
    ]
    seeds = [bytes([c, s]) + json.dumps(b).encode() for c, s, b in bodies]
    seeds += [
        bytes([2, 0]) + _npy(np.ones((1, 4), np.float32)),
        bytes([0, 1 + 4]) + _npy(np.arange(3, dtype=np.int64)),  # spec set 1, input name "x"
        bytes([7, 2]) + _npy(np.zeros((2, 2), np.uint8)),
        bytes([3, 0]) + png,
        bytes([4, 0]) + b"\xff\xd8\xff\xe0" + bytes(16),
    ]
    return tuple(seeds)


def _body(_scratch: Path) -> Harness:
    def one_input(data: bytes) -> None:
        if len(data) < 2:
            return
        specs = _SPECS[data[1] % len(_SPECS)]
        name = _INPUT_NAMES[(data[1] // len(_SPECS)) % len(_INPUT_NAMES)]
        try:
            request = parse_body(
                body=data[2:],
                content_type=_CONTENT_TYPES[data[0] % len(_CONTENT_TYPES)],
                specs=specs,
                source="api",
                limits=_BODY_LIMITS,
                input_name=name,
            )
        except InputRejected:
            return
        if request.tensors is not None:
            assert sum(a.size for a in request.tensors.values()) <= _BODY_LIMITS.max_elements
            assert all(a.dtype.kind in "biuf" for a in request.tensors.values()), (
                "non-numeric tensor accepted"
            )

    seeds = _body_seeds()
    return Harness(one_input, seeds, max_len=4096)


# --- serial frames

_FRAME_SPEC = TensorSpec(name="s", dtype="float32", shape=(2, 3))


def _serial(_scratch: Path) -> Harness:
    def one_input(data: bytes) -> None:
        if len(data) < 2:
            return
        decoder = FrameDecoder(max_payload=1 + data[0] % 64)
        stream = data[2:]
        step = 1 + data[1] % 17  # the line delivers the stream in arbitrary pieces
        for i in range(0, len(stream), step):
            for payload in decoder.feed(stream[i : i + step]):
                assert len(payload) <= decoder.max_payload, "payload over max_payload delivered"
                with contextlib.suppress(InputRejected):
                    parse_sensor_frame(payload, _FRAME_SPEC)
            assert len(decoder._buf) <= decoder._max_body, "decoder buffered past its bound"
        # Round trips: what the encoder produces, the decoder gives back exactly once.
        assert cobs_decode(cobs_encode(stream)) == stream
        payload = stream[:64]  # short: the bitwise CRC is the slowest part of an execution
        assert FrameDecoder(max_payload=max(1, len(payload))).feed(encode_frame(payload)) == [payload]

    good = encode_frame(b"\x00\x00\x00\x07" + np.arange(6, dtype="<f4").tobytes())
    seeds = (
        bytes([24, 16]) + good,
        bytes([24, 3]) + b"\x00garbage" + good[:10] + good + good,
        bytes([0, 0]) + bytes(range(256)),
    )
    return Harness(one_input, seeds, max_len=320)


# --- MQTT inbound

_FLEET, _DEVICE = "fleet", "dev-1"


def _mqtt(scratch: Path) -> Harness:
    """The link's message callback (what paho calls for every PUBLISH the broker sends) with the service's
    input wiring behind it: exact topic match, size limit, queue, then the same body parser as the API."""
    outbox = Outbox(path=scratch / "outbox.db", storage_key=bytes(32), device_id=_DEVICE)
    link = MqttLink(config=LinkConfig(inbound_max_bytes=1024), fleet=_FLEET, device_id=_DEVICE, outbox=outbox)
    received: list[object] = []

    def sink(request: object) -> dict[str, object]:
        received.append(request)
        return {"id": "x"}

    source = MqttInputSource(
        sink=sink,  # records the parsed request: the pipeline is not under test
        specs=lambda: _SPECS[1],
        limits=BodyLimits(max_body_bytes=512, max_elements=1 << 12),
        queue_size=4,
    )
    assert not link.on_inbound("input", source.handle, max_bytes=512, on_drop=source.dropped_by_link)
    prefix = f"edgeguard/v1/{_FLEET}/{_DEVICE}/".encode()
    topics = (prefix + b"input", prefix + b"input/x", prefix + b"inpu", prefix + b"cmd", b"edgeguard/v1/+/#")

    def one_input(data: bytes) -> None:
        if not data:
            return
        choice = data[0] % (len(topics) + 1)
        if choice < len(topics):
            topic, payload = topics[choice], data[1:]
        else:  # a topic straight from the input (a broker may send any bytes, UTF-8 or not)
            topic, _, payload = data[1:].partition(b"\xff")
        message = MQTTMessage(mid=1, topic=topic)
        message.payload = payload
        before_failed, before_received = source.counts["failed"], len(received)
        link._on_message(None, None, message)
        source._queue.put(None)
        source._run()
        assert source.counts["failed"] == before_failed, "the input path failed with an unexpected error"
        if len(received) != before_received:
            assert topic == topics[0] and len(payload) <= 512, f"delivered from {topic!r}"

    seeds = (*(bytes([0]) + s[2:] for s in _body_seeds()), bytes([5]) + prefix + b"input\xff{}")
    return Harness(one_input, seeds, max_len=2048, close=outbox.close)


# --- tokens file


def _tokens(scratch: Path) -> Harness:
    # tmpfs where there is one: one file write per input, and the disk is not worn by the fuzzer.
    shm = Path("/dev/shm")
    root = Path(os.environ.get("EDGEGUARD_FUZZ_TMP", shm if shm.is_dir() else scratch))
    path = root / f"edgeguard-fuzz-tokens-{os.getpid()}"

    def one_input(data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            store = TokenStore.from_file(path)
        except ConfigError:
            return
        assert len(store) <= 256

    seeds = (
        b"# comment\nops infer,status aaaaaaaaaaaaaaaaaaaa\nadmin admin bbbbbbbbbbbbbbbbbbbb  # trailing\n",
        b"one infer cccccccccccccccccccc\r\ntwo status,admin dddddddddddddddddddd\r\n",
        "\ufeffnaïve infer eeeeeeeeeeeeeeee#ffff\n".encode(),
    )
    return Harness(one_input, seeds, max_len=4096)


TARGETS: tuple[Target, ...] = (
    Target("bundle", "edgeguard.bundle open_bundle + inspect_bundle on raw bytes", "BundleRejected", _bundle),
    Target(
        "bundle-manifest",
        "edgeguard.bundle open_bundle, manifest signed by a trusted key",
        "BundleRejected",
        _bundle_manifest,
    ),
    Target("golden", "edgeguard.bundle decode_golden (.npz behind the signature)", "BundleRejected", _golden),
    Target(
        "body",
        "edgeguard.sources.parse_body (JSON, .npy, image, sniffing)",
        "InputRejected",
        _body,
    ),
    Target("serial", "edgeguard.sources.framing FrameDecoder + parse_sensor_frame", "InputRejected", _serial),
    Target(
        "mqtt",
        "MqttLink message callback -> InboundRouter -> MqttInputSource -> parse_body",
        "dropped and counted",
        _mqtt,
    ),
    Target("tokens", "edgeguard.sources TokenStore.from_file", "ConfigError", _tokens),
)


def target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise KeyError(name)


def names() -> Sequence[str]:
    return [t.name for t in TARGETS]
