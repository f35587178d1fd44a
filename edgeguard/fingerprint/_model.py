"""A model file (ONNX or TFLite) opened on the plain CPU kernels, with fixed input shapes.

Fingerprints and explanations compare outputs, so they run on the reference kernels that every other result
is checked against (``reference_accelerator``), never on an accelerator whose numbers may differ slightly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard._safeio import read_checked
from edgeguard.engine import Backend, open_backend, reference_accelerator
from edgeguard.errors import ConfigError

__all__ = ["InputSpec", "LoadedModel", "load_model", "model_format", "parse_shapes", "MAX_MODEL_BYTES"]

MAX_MODEL_BYTES = 2 * 1024**3  # what a bundle may carry (BundleLimits); a model file larger is refused
_TFLITE_MAGIC = b"TFL3"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def model_format(data: bytes | bytearray, path: Path) -> str:
    """``tflite`` when the FlatBuffer identifier says so (bytes 4..8), else ``onnx`` (.onnx files)."""
    if bytes(data[4:8]) == _TFLITE_MAGIC:
        return "tflite"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ConfigError(f"{path}: neither an ONNX (.onnx) nor a TFLite model")


def parse_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``--input-shape NAME=1,3,320,320`` options into a mapping (models that declare dynamic axes)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values or []:
        name, sep, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 or d > 65536 for d in shape):
            raise ConfigError(f"--input-shape {value!r}: expected NAME=D,D,... with positive dimensions")
        shapes[name] = shape
    return shapes


class LoadedModel:
    """One backend on the reference kernels plus the fixed shape of each input."""

    def __init__(self, backend: Backend, specs: tuple[InputSpec, ...], fmt: str) -> None:
        self.backend = backend
        self.inputs = specs
        self.format = fmt

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(inputs)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(path: Path, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
               threads: int = 2) -> LoadedModel:
    """Open ``path`` (no symbolic link followed, bounded read) on the CPU reference kernels.

    A dynamic batch axis becomes 1; any other dynamic axis needs ``shapes`` (``--input-shape NAME=...``)."""
    data = read_checked(path, what="model", limit=MAX_MODEL_BYTES, error=ConfigError).data
    fmt = model_format(data, path)
    backend = open_backend(fmt, reference_accelerator(fmt), data, threads)
    given = dict(shapes or {})
    specs: list[InputSpec] = []
    try:
        for info in backend.inputs:
            shape = given.pop(info.name, None)
            if shape is None:
                dims = list(info.shape)
                if dims and dims[0] is None:
                    dims[0] = 1
                if any(d is None for d in dims):
                    raise ConfigError(
                        f"{path}: input {info.name!r} has dynamic axes {info.shape}: "
                        f"give --input-shape {info.name}=D,D,...")
                shape = tuple(int(d) for d in dims if d is not None)
            elif len(shape) != len(info.shape) or any(
                d is not None and d != s for d, s in zip(info.shape, shape, strict=False)
            ):
                raise ConfigError(f"--input-shape {info.name}: {shape} does not fit the model's {info.shape}")
            specs.append(InputSpec(info.name, np.dtype(info.dtype), shape))
        if given:
            raise ConfigError(f"--input-shape: the model has no input named {sorted(given)[0]!r}")
    except BaseException:
        backend.close()
        raise
    return LoadedModel(backend, tuple(specs), fmt)
