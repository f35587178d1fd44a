"""The verified manifest of a sealed bundle: typed, frozen, and shared by every part of the runtime.

Objects of these types are only ever built from bundle bytes by ``edgeguard.bundle._open`` (after the
signature has been checked) or by the publisher-side packer. The engine reads ``inputs``/``outputs`` for the
input guard, ``preprocess``/``postprocess`` for image handling and ``golden_tolerance`` for the self-test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

__all__ = ["ModelFormat", "TensorSpec", "Tolerance", "GoldenSample", "Manifest", "OutputPolicy", "NoiseSpec"]

ModelFormat = Literal["onnx", "tflite"]

# numpy dtype names a tensor may declare (anything else is refused as malformed).
TENSOR_DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as declared in the manifest.

    ``shape`` holds a positive int for a fixed axis and ``None`` for a dynamic one (batch, image size).
    ``value_range`` is the inclusive range of valid values for an input (the input guard enforces it).
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    value_range: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.value_range is not None:
            out["range"] = [self.value_range[0], self.value_range[1]]
        return out


@dataclass(frozen=True)
class Tolerance:
    """How close an accelerator's output must be to the reference: ``|a - b| <= atol + rtol * |b|``."""

    rtol: float = 1e-3
    atol: float = 1e-4

    def to_json(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol}


@dataclass(frozen=True)
class GoldenSample:
    """One golden vector: inputs and the outputs the publisher's reference run produced for them."""

    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class NoiseSpec:
    """Calibrated noise added to every reported score: Laplace with scale ``b`` (``kind = "laplace"``) or
    Gaussian with standard deviation ``scale`` (``"gaussian"``), drawn for each request straight
    from ``os.urandom`` (no generator state to predict or replay)."""

    kind: Literal["laplace", "gaussian"]
    scale: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}


@dataclass(frozen=True)
class OutputPolicy:
    """What of a result may leave the device (the manifest's ``output``; docs/security.md, "Output
    hardening"). Signed with the bundle, so the device cannot be told to loosen it."""

    top_k: int | None = None  # at most this many classes / detections per result
    round_decimals: int | None = None  # scores (and raw outputs, where allowed) rounded to this many decimals
    raw_logits: bool = False  # raw output tensors may leave (only where no postprocess result replaces them)
    noise: NoiseSpec | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"raw_logits": self.raw_logits}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.round_decimals is not None:
            out["round_decimals"] = self.round_decimals
        if self.noise is not None:
            out["noise"] = self.noise.to_json()
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything the publisher signed about a model, except the model itself."""

    format: ModelFormat
    name: str
    version: int
    created: str  # ISO 8601, UTC
    payload_sha256: str  # hex digest of the plaintext model: its identity (heartbeats); see docs/bundle.md
    payload_size: int  # bytes of the plaintext model
    chunk_size: int  # plaintext bytes per AEAD chunk
    publisher_key_id: str
    recipient_key_ids: tuple[str, ...]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    not_after: str | None = None  # ISO 8601, UTC; None = never expires
    min_runtime: str = "0.1.0"
    golden_count: int = 0
    golden_tolerance: Tolerance = field(default_factory=Tolerance)
    # Free-form but size-limited JSON objects whose schemas belong to the engine (validated there):
    preprocess: Mapping[str, Any] | None = None  # image preprocessing (resize, normalise, layout...)
    postprocess: Mapping[str, Any] | None = None  # top-k, YOLO box decoding + NMS...
    input_stats: Mapping[str, Any] | None = None  # per-channel statistics for out-of-distribution flags
    quantization: Mapping[str, Any] | None = None  # how the model was quantized, for reporting
    defence: Mapping[str, Any] | None = None  # model defences: adversarial-input detection (docs/security.md)
    description: str = ""
    golden_size: int = 0  # bytes of the golden-vector .npz carried encrypted after the wrapped keys
    # hex SHA-256 of a label and the content key: every recipient checks it unwrapped this same key
    key_commitment: str = ""
    bundle_id: str = ""  # 32 random hex digits: makes every manifest (hashed into HPKE info and AAD) unique
    # Cipher suite of the chunks and index digests (edgeguard.bundle._format.SUITES); signed with the rest.
    suite: str = "aes256gcm-sha256"
    # Output hardening (None: not declared; results leave as before hardening existed: raw output tensors
    # when there is no postprocess result). Left out of the JSON when None, so older bundles stay byte-equal.
    output: OutputPolicy | None = None

    def expires_at(self) -> datetime | None:
        """``not_after`` as an aware datetime (None: never expires). ``_open`` checked its format already."""
        if self.not_after is None:
            return None
        text = self.not_after
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object stored in a bundle (and printed by ``edgeguard inspect``)."""
        out: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "not_after": self.not_after,
            "payload_sha256": self.payload_sha256,
            "payload_size": self.payload_size,
            "chunk_size": self.chunk_size,
            "publisher_key_id": self.publisher_key_id,
            "recipient_key_ids": list(self.recipient_key_ids),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "min_runtime": self.min_runtime,
            "golden_count": self.golden_count,
            "golden_size": self.golden_size,
            "golden_tolerance": self.golden_tolerance.to_json(),
            "description": self.description,
            "bundle_id": self.bundle_id,
            "key_commitment": self.key_commitment,
        }
        if self.suite != "aes256gcm-sha256":
            # The default is left out: such a bundle is byte for byte what runtimes before suites read.
            out["suite"] = self.suite
        for key in ("preprocess", "postprocess", "input_stats", "quantization", "defence"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dict(value)
        if self.output is not None:
            out["output"] = self.output.to_json()
        return out
