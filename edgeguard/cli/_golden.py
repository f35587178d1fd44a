"""Golden inputs for ``pack --golden-from DIR`` and ``init``: sample images through the manifest's own
preprocessing, so the golden vectors are exactly what the device feeds the model. Their outputs come from the
CPU reference run that ``pack_bundle`` already does for inputs-only samples."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.bundle import Manifest, TensorSpec
from edgeguard.bundle._reference import introspect
from edgeguard.engine.preprocess import Preprocessor
from edgeguard.errors import ConfigError, InputRejected

__all__ = ["golden_from_images", "synthetic_golden", "IMAGE_SUFFIXES", "MAX_GOLDEN_IMAGES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_GOLDEN_IMAGES = 16  # each sample is checked on every model load: a few are enough, many slow the start
Sample = dict[str, dict[str, np.ndarray]]


def _inputs(meta: Mapping[str, Any], model: bytes, model_format: str) -> tuple[TensorSpec, ...]:
    if "inputs" not in meta:
        return introspect(model, model_format)[0]
    try:
        return tuple(
            TensorSpec(
                name=str(t["name"]),
                dtype=str(t["dtype"]),
                shape=tuple(t["shape"]),
                value_range=tuple(t["range"]) if t.get("range") else None,
            )
            for t in meta["inputs"]
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"--meta inputs: each tensor needs name, dtype and shape ({exc})") from None


def _preprocessor(meta: Mapping[str, Any], model: bytes, model_format: str) -> Preprocessor:
    if not isinstance(meta.get("preprocess"), dict):
        raise ConfigError("--golden-from needs --meta with a 'preprocess' section (how images become inputs)")
    # Only the fields the preprocessor reads matter; the rest of the manifest is made at packing.
    draft = Manifest(
        format="onnx" if model_format == "onnx" else "tflite",
        name="draft",
        version=0,
        created="",
        payload_sha256="",
        payload_size=0,
        chunk_size=0,
        publisher_key_id="",
        recipient_key_ids=(),
        inputs=_inputs(meta, model, model_format),
        preprocess=meta["preprocess"],
    )
    pre = Preprocessor.from_manifest(draft)
    assert pre is not None  # preprocess is a dict, checked above
    return pre


def golden_from_images(
    directory: Path, *, model: bytes, model_format: str, meta: Mapping[str, Any]
) -> list[Sample]:
    """One inputs-only sample per PNG/JPEG in ``directory`` (sorted by name, at most MAX_GOLDEN_IMAGES)."""
    pre = _preprocessor(meta, model, model_format)
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise ConfigError(f"--golden-from {directory}: {exc.strerror or exc}") from None
    if not files:
        raise ConfigError(f"--golden-from {directory}: no .png/.jpg/.jpeg image in it")
    if len(files) > MAX_GOLDEN_IMAGES:
        raise ConfigError(
            f"--golden-from {directory}: {len(files)} images; give at most {MAX_GOLDEN_IMAGES} "
            "(each is re-checked at every model load)"
        )
    samples: list[Sample] = []
    for path in files:
        data = _read_image(path, pre.limits.max_encoded_bytes)
        try:
            samples.append({"in": pre(data).tensors, "out": {}})
        except InputRejected as exc:
            raise ConfigError(f"--golden-from {path}: {exc}") from None
    return samples


def _read_image(path: Path, limit: int) -> bytes:
    # Like key files: one descriptor, no symlink followed, regular file only, size known before the read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"--golden-from {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--golden-from {path}: not a regular file")
        if st.st_size > limit:
            raise ConfigError(f"--golden-from {path}: {st.st_size} bytes, over the image limit of {limit}")
        return f.read(limit + 1)


def synthetic_golden(model: bytes, *, model_format: str, meta: Mapping[str, Any]) -> list[Sample]:
    """One deterministic sample when no photo is at hand (``edgeguard init``): a smooth picture through the
    preprocessing when the model takes images, else values spread over each input's declared range."""
    rng = np.random.default_rng(0)
    if isinstance(meta.get("preprocess"), dict):
        yy, xx = np.mgrid[0:240, 0:320]
        picture = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) * 255 // 558], axis=2)
        pre = _preprocessor(meta, model, model_format)
        return [{"in": pre(picture.astype(np.uint8)).tensors, "out": {}}]
    tensors: dict[str, np.ndarray] = {}
    for spec in _inputs(meta, model, model_format):
        if any(d is None for d in spec.shape):
            raise ConfigError(f"input {spec.name!r} has a dynamic shape: declare it in the model's meta")
        shape = tuple(int(d) for d in spec.shape if d is not None)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = spec.value_range or (info.min, info.max)
            tensors[spec.name] = rng.integers(int(lo), int(hi), size=shape, endpoint=True).astype(dtype)
        else:
            lo, hi = spec.value_range or (0.0, 1.0)
            tensors[spec.name] = rng.uniform(lo, hi, size=shape).astype(dtype)
    return [{"in": tensors, "out": {}}]

