"""Calibration data: a folder of images or an ``.npz``, split into calibration and held-out samples.

Images go through the same ``Preprocessor`` the engine uses at run time (from a preprocess declaration, by
default a YOLO-style letterbox to the model size, RGB, ``/255``, NCHW float32), so the ranges the quantizer
measures are the ranges the device will see. A handful of real photographs is not enough to calibrate on, so
each image is augmented with flips and crops (seeded, reproducible). The held-out samples, never used to
calibrate, are the un-augmented originals plus one crop of each image: the accuracy guard judges on them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.bundle.manifest import Manifest, TensorSpec
from edgeguard.engine.preprocess import ImageLimits, Preprocessor, decode_image, parse_preprocess
from edgeguard.errors import ConfigError, InputRejected

__all__ = ["CalibrationSet", "load_calibration", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_IMAGES = 1000
_MAX_NPZ_BYTES = 2 * 1024**3

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationSet:
    calibration: tuple[Sample, ...]
    held_out: tuple[Sample, ...]
    source: str  # one line: where the samples came from


def _variants(pixels: np.ndarray, rng: np.random.Generator, crops: int) -> list[np.ndarray]:
    """The original, its mirror image, then random crops (60-90 % of each side) of either."""
    out = [pixels, pixels[:, ::-1]]
    h, w = pixels.shape[:2]
    for i in range(crops):
        frac_h, frac_w = rng.uniform(0.6, 0.9, size=2)
        ch, cw = max(8, int(h * frac_h)), max(8, int(w * frac_w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        base = pixels if i % 2 == 0 else pixels[:, ::-1]
        out.append(np.ascontiguousarray(base[y:y + ch, x:x + cw]))
    return out


def _image_preprocessor(
    inputs: Mapping[str, tuple[int, ...]], preprocess: Mapping[str, Any] | None
) -> Preprocessor:
    if len(inputs) != 1:
        raise ConfigError(f"image calibration needs a single-input model; this one has {', '.join(inputs)} "
                          "(use an .npz)")
    name, shape = next(iter(inputs.items()))
    manifest = Manifest(
        format="onnx", name="calibration", version=1, created="", payload_sha256="", payload_size=0,
        chunk_size=1, publisher_key_id="", recipient_key_ids=(),
        inputs=(TensorSpec(name, "float32", shape),),
        preprocess=dict(preprocess) if preprocess is not None else {"input": name},
    )
    spec = parse_preprocess(manifest)
    assert spec is not None
    return Preprocessor(spec, limits=ImageLimits())


def _from_images(
    folder: Path, inputs: Mapping[str, tuple[int, ...]], preprocess: Mapping[str, Any] | None,
    samples: int, seed: int,
) -> CalibrationSet:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no .png/.jpg images to calibrate on")
    files = files[:_MAX_IMAGES]
    pre = _image_preprocessor(inputs, preprocess)
    rng = np.random.default_rng(seed)
    crops = max(2, -(-samples // len(files)) - 2)
    calibration: list[Sample] = []
    held_out: list[Sample] = []
    for path in files:
        try:
            frame = decode_image(path.read_bytes(), limits=pre.limits)
        except InputRejected as exc:
            raise ConfigError(f"{path}: {exc}") from None
        variants = _variants(frame, rng, crops)
        for index, variant in enumerate(variants):
            tensors = pre(variant).tensors
            # Held out: the original and the last crop; everything else calibrates.
            (held_out if index in (0, len(variants) - 1) else calibration).append(tensors)
    return CalibrationSet(tuple(calibration), tuple(held_out),
                          f"{len(files)} images in {folder} ({len(calibration)} calibration + "
                          f"{len(held_out)} held-out samples after flips and crops)")


def _from_npz(path: Path, inputs: Mapping[str, tuple[int, ...]]) -> CalibrationSet:
    if path.stat().st_size > _MAX_NPZ_BYTES:
        raise ConfigError(f"{path}: over {_MAX_NPZ_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable .npz: {exc}") from None
    samples: list[Sample] = []
    if all(key in inputs for key in arrays) and arrays:
        # One array per input, samples stacked along the batch axis.
        counts = {key: arr.shape[0] if arr.ndim else 0 for key, arr in arrays.items()}
        missing = [name for name in inputs if name not in arrays]
        if missing or len(set(counts.values())) != 1:
            raise ConfigError(f"{path}: needs one array per input ({', '.join(inputs)}) with the same "
                              f"number of samples, got {counts}")
        for i in range(next(iter(counts.values()))):
            samples.append({name: arrays[name][i:i + 1] for name in inputs})
    else:
        # The golden-vector layout: "<i>/in/<input name>".
        heads = {k.split("/")[0] for k in arrays if k.count("/") >= 2}
        for i in sorted(int(h) for h in heads if h.isdigit()):
            keys = {name: f"{i}/in/{name}" for name in inputs}
            if any(key not in arrays for key in keys.values()):
                raise ConfigError(f"{path}: sample {i} lacks an input of {', '.join(inputs)}")
            samples.append({name: arrays[key] for name, key in keys.items()})
    if not samples:
        raise ConfigError(f"{path}: no samples (expected arrays named after the inputs "
                          f"{', '.join(inputs)} or '<i>/in/<name>' keys)")
    for i, sample in enumerate(samples):
        for name, arr in sample.items():
            if tuple(arr.shape) != inputs[name]:
                raise ConfigError(f"{path}: sample {i} input {name!r} has shape {tuple(arr.shape)}, the "
                                  f"model takes {list(inputs[name])} (pass --input-shape)")
            sample[name] = np.ascontiguousarray(arr.astype(np.float32, copy=False))
    held = max(1, len(samples) // 4)
    if len(samples) == 1:
        return CalibrationSet(tuple(samples), tuple(samples), f"1 sample in {path} (also used as held-out)")
    return CalibrationSet(tuple(samples[:-held]), tuple(samples[-held:]),
                          f"{len(samples)} samples in {path} ({len(samples) - held} calibration + "
                          f"{held} held-out)")


def load_calibration(
    source: Path,
    inputs: Mapping[str, Sequence[int]],
    *,
    preprocess: Mapping[str, Any] | None = None,
    samples: int = 32,
    seed: int = 0,
) -> CalibrationSet:
    """Calibration and held-out samples for a model with static ``inputs`` shapes."""
    static = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
    if source.is_dir():
        return _from_images(source, static, preprocess, samples, seed)
    if source.suffix == ".npz" and source.is_file():
        return _from_npz(source, static)
    raise ConfigError(f"--calibration {source}: expected a folder of images or an .npz file")
