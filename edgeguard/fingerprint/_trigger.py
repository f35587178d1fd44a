"""The trigger file: the publisher's secret evidence of ownership (``edgeguard fingerprint make``).

An ``.npz`` written with mode 0600 (whoever holds it can craft a model that passes, or learn which inputs to
avoid answering). ``load_trigger`` is the one reader of its bytes, in this order:

1. the file is opened without following a link, regular, private (0600) and at most ``MAX_TRIGGER_BYTES``;
2. the zip directory names only the expected members, at most ``MAX_MEMBERS``, and their declared sizes add
   up to at most ``MAX_TRIGGER_BYTES`` (a small compressed member cannot inflate past that: the reader stops
   at the declared size);
3. ``numpy.load(allow_pickle=False)``: no object arrays, so loading runs no code;
4. every array's dtype, rank and shape agree with the others (``n`` triggers, ``d`` expected values each).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

__all__ = ["TriggerSet", "load_trigger", "save_trigger", "MAX_TRIGGER_BYTES", "MAX_TRIGGERS",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
MAX_TRIGGER_BYTES = 256 * 1024 * 1024  # 64 triggers of a 1x3x640x640 float32 input are 315 MB: use fewer
MAX_TRIGGERS = 1024
MAX_INPUTS = 16
MAX_EXPECTED = 65536  # expected values kept per trigger (make keeps at most 4096)
MAX_MEMBERS = 5 + MAX_INPUTS


@dataclass(frozen=True)
class TriggerSet:
    """``inputs[k]`` holds every trigger's value of input ``names[k]`` (shape ``(n, *input_shape)``);
    ``expected`` the owner's outputs on them (``(n, d)``, at the flat output positions ``index``)."""

    names: tuple[str, ...]
    inputs: tuple[np.ndarray, ...]
    expected: np.ndarray
    index: np.ndarray
    output_size: int
    threshold: float

    @property
    def count(self) -> int:
        return int(self.expected.shape[0])


def save_trigger(path: Path, trigger: TriggerSet) -> None:
    """Write atomically with mode 0600 (``atomic_write``)."""
    arrays: dict[str, np.ndarray] = {
        "version": np.array(FORMAT_VERSION, dtype=np.int64),
        "names": np.array(trigger.names, dtype=np.str_),
        "expected": trigger.expected.astype(np.float32),
        "index": trigger.index.astype(np.int64),
        "meta": np.array([trigger.output_size, trigger.threshold], dtype=np.float64),
    }
    for k, value in enumerate(trigger.inputs):
        arrays[f"input{k}"] = value
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buf.getvalue(), mode=0o600)


def _bad(path: Path, why: str) -> ConfigError:
    return ConfigError(f"trigger file {path}: {why}")


def load_trigger(path: Path, *, limit: int = MAX_TRIGGER_BYTES) -> TriggerSet:
    """Read and check a trigger file (``ConfigError``, one line, for anything wrong with it)."""
    data = read_checked(path, what="trigger file", limit=limit, error=ConfigError, private=True).data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise _bad(path, f"not an .npz archive ({exc})") from None
    allowed = {"version", "names", "expected", "index", "meta"} | {f"input{k}" for k in range(MAX_INPUTS)}
    if len(infos) > MAX_MEMBERS or any(i.filename.removesuffix(".npy") not in allowed for i in infos):
        raise _bad(path, "unexpected members (not written by edgeguard fingerprint make)")
    if sum(i.file_size for i in infos) > limit:
        raise _bad(path, f"its arrays would take more than {limit} bytes")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _bad(path, f"unreadable array ({' '.join(str(exc).split())[:120]})") from None
    return _checked(path, arrays)


def _checked(path: Path, arrays: dict[str, np.ndarray]) -> TriggerSet:
    for key in ("version", "names", "expected", "index", "meta"):
        if key not in arrays:
            raise _bad(path, f"missing {key!r}")
    version = arrays["version"]
    if version.shape != () or version.dtype.kind != "i" or int(version) != FORMAT_VERSION:
        raise _bad(path, f"format version {version.tolist()!r} (this edgeguard reads {FORMAT_VERSION})")
    names = arrays["names"]
    if names.dtype.kind != "U" or names.ndim != 1 or not 1 <= names.shape[0] <= MAX_INPUTS:
        raise _bad(path, "'names' must list 1..16 input names")
    expected, index, meta = arrays["expected"], arrays["index"], arrays["meta"]
    if expected.dtype != np.float32 or expected.ndim != 2:
        raise _bad(path, "'expected' must be a float32 matrix (triggers x values)")
    n, d = expected.shape
    if not 2 <= n <= MAX_TRIGGERS or not 2 <= d <= MAX_EXPECTED:
        raise _bad(path, f"{n} triggers of {d} values (2..{MAX_TRIGGERS} triggers, 2..{MAX_EXPECTED} values)")
    if not np.all(np.isfinite(expected)):
        raise _bad(path, "'expected' holds NaN or infinity")
    if meta.shape != (2,) or meta.dtype != np.float64 or not np.all(np.isfinite(meta)):
        raise _bad(path, "'meta' must be [output_size, threshold]")
    output_size, threshold = int(meta[0]), float(meta[1])
    if not 0.0 < threshold <= 1.0:
        raise _bad(path, f"threshold {threshold} outside (0, 1]")
    if index.dtype != np.int64 or index.shape != (d,) or output_size < d:
        raise _bad(path, "'index' must hold one int64 output position per expected value")
    if index.size and (index.min() < 0 or index.max() >= output_size):
        raise _bad(path, "'index' points outside the model's outputs")
    inputs: list[np.ndarray] = []
    for k in range(names.shape[0]):
        value = arrays.get(f"input{k}")
        if value is None:
            raise _bad(path, f"missing the values of input {str(names[k])!r}")
        if value.dtype.kind not in "fiub" or value.ndim < 1 or value.shape[0] != n:
            raise _bad(path, f"input {str(names[k])!r}: {n} numeric values expected, got {value.shape}")
        inputs.append(value)
    if len(inputs) != sum(1 for key in arrays if key.startswith("input")):
        raise _bad(path, "more input arrays than input names")
    return TriggerSet(tuple(str(x) for x in names), tuple(inputs), expected, index, output_size, threshold)
