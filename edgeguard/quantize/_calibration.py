"""Calibration data: a folder of images, a folder of raw files or an ``.npz``, split into calibration and
held-out samples.

Images go through the same ``Preprocessor`` the engine uses at run time (from a preprocess declaration, by
default a YOLO-style letterbox to the model size, RGB, ``/255``, NCHW float32), so the ranges the quantizer
measures are the ranges the device will see. A handful of real photographs is not enough to calibrate on, so
each image is augmented with flips and crops (seeded, reproducible). The held-out samples, never used to
calibrate, are the un-augmented originals plus one crop of each image: the accuracy guard judges on them.

Inputs keep their own dtype: an ``.npz`` may hold integer arrays (token ids, byte values, indices) for
integer inputs, and a folder of raw files feeds a byte/sequence model with one integer input ``[1, L]`` (or
``[L]``): every file in it, images included, is read as bytes, each file giving windows of ``L`` byte values
(0..255, the last window padded with 0), every fourth window held out. Float values are never silently
truncated into an integer input.
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

__all__ = ["CalibrationSet", "load_calibration", "calibration_shapes", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_IMAGES = 1000
_MAX_NPZ_BYTES = 2 * 1024**3
_MAX_RAW_FILES = 1000
_MAX_RAW_BYTES = 16 * 1024**2  # read from each raw file at most: windows past it add nothing new

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


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size > _MAX_NPZ_BYTES:
        raise ConfigError(f"{path}: over {_MAX_NPZ_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable .npz: {exc}") from None


def calibration_shapes(source: Path, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The sample shape of each input an ``.npz`` holds (to fix dynamic axes); empty for other sources."""
    if source.suffix != ".npz" or not source.is_file():
        return {}
    arrays = _read_npz(source)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name in arrays and arrays[name].ndim:
            shapes[name] = (1, *arrays[name].shape[1:])
        elif f"0/in/{name}" in arrays:
            shapes[name] = tuple(arrays[f"0/in/{name}"].shape)
    return shapes


def _as_input(path: Path, index: int, name: str, arr: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ConfigError(f"{path}: sample {index} input {name!r} holds {arr.dtype} values, the model "
                              f"takes {dtype} (store the integer values themselves)")
        if arr.size and dtype != np.bool_:
            info = np.iinfo(dtype)
            if int(arr.min()) < info.min or int(arr.max()) > info.max:
                raise ConfigError(f"{path}: sample {index} input {name!r} has values outside {dtype}")
    return np.ascontiguousarray(arr.astype(dtype))


def _split(samples: list[Sample], what: str) -> CalibrationSet:
    held = max(1, len(samples) // 4)
    if len(samples) == 1:
        return CalibrationSet(tuple(samples), tuple(samples), f"1 sample in {what} (also used as held-out)")
    return CalibrationSet(tuple(samples[:-held]), tuple(samples[-held:]),
                          f"{len(samples)} samples in {what} ({len(samples) - held} calibration + "
                          f"{held} held-out)")


def _from_npz(path: Path, inputs: Mapping[str, tuple[int, ...]],
              dtypes: Mapping[str, np.dtype[Any]]) -> CalibrationSet:
    arrays = _read_npz(path)
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
            sample[name] = _as_input(path, i, name, arr, dtypes[name])
    return _split(samples, str(path))


def _from_raw_files(
    folder: Path, files: Sequence[Path], inputs: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, np.dtype[Any]], samples: int,
) -> CalibrationSet:
    """Byte windows of raw files for a single integer-input sequence model."""
    if len(inputs) != 1:
        raise ConfigError(f"{folder}: raw-file calibration needs a single-input model; this one has "
                          f"{', '.join(inputs)} (use an .npz)")
    name, shape = next(iter(inputs.items()))
    dtype = dtypes[name]
    fits = len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
    if not np.issubdtype(dtype, np.integer) or not fits:
        raise ConfigError(f"{folder}: raw files feed only an integer input of shape [1, L] or [L]; input "
                          f"{name!r} is {dtype} {list(shape)} (use an .npz)")
    length = shape[-1]
    per_file = max(1, -(-samples // len(files)))
    windows: list[Sample] = []
    for path in files:
        with path.open("rb") as f:
            data = np.frombuffer(f.read(min(_MAX_RAW_BYTES, length * per_file)), dtype=np.uint8)
        for start in range(0, max(1, data.size), length):
            window = np.zeros(length, dtype=dtype)
            chunk = data[start:start + length]
            window[:chunk.size] = chunk
            windows.append({name: window.reshape(shape)})
            if len(windows) >= max(samples, len(files)) or start + length >= data.size:
                break
    # Every fourth window judges (from different files when files are short), the rest calibrate.
    held = [w for i, w in enumerate(windows) if i % 4 == 3] or windows[-1:]
    calib = [w for i, w in enumerate(windows) if i % 4 != 3] or windows
    return CalibrationSet(tuple(calib), tuple(held),
                          f"{len(files)} raw files in {folder} ({len(calib)} calibration + {len(held)} "
                          f"held-out windows of {length} bytes)")


def load_calibration(
    source: Path,
    inputs: Mapping[str, Sequence[int]],
    *,
    dtypes: Mapping[str, str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    samples: int = 32,
    seed: int = 0,
) -> CalibrationSet:
    """Calibration and held-out samples for a model with static ``inputs`` shapes (``dtypes``: float32)."""
    static = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
    types = {name: np.dtype((dtypes or {}).get(name, "float32")) for name in static}
    if source.is_dir():
        if all(t == np.float32 for t in types.values()):
            return _from_images(source, static, preprocess, samples, seed)
        # A model with an integer input reads any file as raw bytes, images included.
        entries = sorted(p for p in source.iterdir() if p.is_file() and not p.is_symlink())
        if not entries:
            raise ConfigError(f"{source}: no files to calibrate on")
        return _from_raw_files(source, entries[:_MAX_RAW_FILES], static, types, samples)
    if source.suffix == ".npz" and source.is_file():
        return _from_npz(source, static, types)
    raise ConfigError(f"--calibration {source}: expected a folder of images or raw files, or an .npz file")
