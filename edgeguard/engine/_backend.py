"""The backend interface: one loaded model on one accelerator.

``Backend.run`` is the template method every caller uses: it calls the library through ``_run`` and turns
whatever the library raises into a one-line :class:`BackendError`, so the fast path only ever sees one family.
"""

from __future__ import annotations

import ctypes
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator

__all__ = ["Backend", "TensorInfo", "one_line", "scrub_bytes"]

_MAX_MESSAGE = 300


def one_line(exc: BaseException) -> str:
    """A short single-line description of a library exception (some embed whole model buffers)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def scrub_bytes(buf: bytes) -> bool:
    """Zero an immutable ``bytes`` object in place once nothing else may read it (best effort, CPython only).

    Both runtimes only accept ``bytes``, so handing them the model means one extra copy of the plaintext; this
    wipes that copy. It refuses (returns False) when other references exist, because then the buffer may still
    be in use (a TFLite interpreter reads the model buffer for as long as it lives).
    """
    if sys.implementation.name != "cpython" or not buf:
        return False
    # getrefcount sees: the caller's variable, the argument, and getrefcount's own argument.
    if sys.getrefcount(buf) > 3:
        return False
    offset = sys.getsizeof(b"") - 1  # header size of a bytes object; the data follows it
    ctypes.memset(id(buf) + offset, 0, len(buf))
    return True


class TensorInfo:
    """Name, numpy dtype and shape (``None``: dynamic axis) of a model input or output (library view)."""

    __slots__ = ("dtype", "name", "shape")

    def __init__(self, name: str, dtype: np.dtype[Any], shape: tuple[int | None, ...]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape})"


class Backend(ABC):
    """A model loaded on one accelerator. Subclasses implement ``_run`` and ``_close``."""

    runtime: str = "?"  # "onnxruntime" or "litert"

    def __init__(self, *, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self._closed = False

    @property
    def label(self) -> str:
        return self.accelerator.label

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; any library failure becomes ``BackendError`` naming the accelerator."""
        if self._closed:
            raise BackendError(f"{self.label}: backend is closed")
        try:
            return self._run(inputs)
        except BackendError:
            raise
        except Exception as exc:  # the library's own exception types differ per version and build
            raise BackendError(f"{self.runtime}/{self.label}: run failed: {one_line(exc)}") from exc

    @abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release library resources (optional)."""

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "accelerator": self.accelerator.kind, "label": self.label}
