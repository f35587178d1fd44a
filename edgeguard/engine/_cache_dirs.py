"""Accelerator caches that hold the model: allowed only on a RAM filesystem.

A serialized TensorRT engine (``engine_cache_path``) and an OpenVINO compiled-model blob (``cache_dir``) hold
the weights: written to a persistent disk they would be a plaintext copy of the sealed model that outlives the
process, which the bundle format promises never happens (docs/bundle.md). Both are off unless a profile sets
them, and a directory that is not on ``tmpfs``/``ramfs`` (e.g. under ``/run`` or ``/dev/shm``) is refused with
a clear error; the accelerator is then not used (the fast path moves on to the next candidate and says why).
The TFLite GPU delegate's ``serialization_dir`` (in ``delegate_options``) caches compiled programs with the
weights and is treated the same. TensorRT's timing cache holds kernel timings only, no weights, and is allowed
anywhere.

Python has no ``statfs`` with the filesystem type, so the type comes from ``/proc/self/mounts``: the longest
mount point that contains the directory (or, before the directory exists, its nearest existing parent, since
the backend creates it there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator, Profile

__all__ = [
    "PLAINTEXT_CACHE_OPTIONS",
    "DELEGATE_CACHE_OPTIONS",
    "RAM_FILESYSTEMS",
    "CacheDir",
    "filesystem_of",
    "check_cache_dirs",
    "cache_dirs",
    "profile_cache_dirs",
]

# accelerator kind -> options whose directory receives a plaintext-equivalent of the model
PLAINTEXT_CACHE_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "tensorrt": ("engine_cache_path",),
    "openvino": ("cache_dir",),
}
# LiteRT delegate kinds -> keys of their free-form ``delegate_options`` that name such a directory
DELEGATE_CACHE_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "gpu": ("serialization_dir",),
    "external": ("serialization_dir",),
}
RAM_FILESYSTEMS: Final[frozenset[str]] = frozenset({"tmpfs", "ramfs"})
_MOUNTS = Path("/proc/self/mounts")
_MAX_MOUNTS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CacheDir:
    """One configured model cache: where it lives and whether it may be used."""

    label: str
    option: str
    path: str
    filesystem: str

    @property
    def in_ram(self) -> bool:
        return self.filesystem in RAM_FILESYSTEMS

    def to_json(self) -> dict[str, object]:
        return {"accelerator": self.label, "option": self.option, "path": self.path,
                "filesystem": self.filesystem, "in_ram": self.in_ram}


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in mount points as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            yield _unescape(parts[1]), parts[2]


def _read_mounts() -> str:
    try:
        with _MOUNTS.open("rb") as f:
            return f.read(_MAX_MOUNTS_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""  # no /proc: the filesystem is "unknown", which is refused like a disk


def filesystem_of(path: Path, *, mounts: str | None = None) -> str:
    """The filesystem type of ``path`` (or of its nearest existing parent), "unknown" when it cannot tell."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    best, fstype = "", "unknown"
    for point, kind in _mounts(_read_mounts() if mounts is None else mounts):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # later lines of the same point shadow earlier ones
            best, fstype = point, kind
    return fstype


def cache_dirs(accelerators: tuple[Accelerator, ...], *, mounts: str | None = None) -> list[CacheDir]:
    """Every model cache the given candidates configure, with its filesystem (``doctor`` shows these)."""
    out = []
    for a in accelerators:
        found = [(option, a.options.get(option)) for option in PLAINTEXT_CACHE_OPTIONS.get(a.kind, ())]
        delegate = a.options.get("delegate_options")
        if isinstance(delegate, Mapping):
            keys = DELEGATE_CACHE_OPTIONS.get(a.kind, ())
            found += [(f"delegate_options.{k}", delegate.get(k)) for k in keys]
        for option, value in found:
            if value is not None:
                path = str(value)
                out.append(CacheDir(a.label, option, path, filesystem_of(Path(path), mounts=mounts)))
    return out


def check_cache_dirs(accelerator: Accelerator, *, mounts: str | None = None) -> None:
    """``BackendError`` when ``accelerator`` would write a model cache anywhere but to a RAM filesystem."""
    for c in cache_dirs((accelerator,), mounts=mounts):
        if not c.in_ram:
            raise BackendError(
                f"{c.label}: {c.option} {c.path} is on {c.filesystem}, not a RAM filesystem (tmpfs/ramfs): "
                f"the cache holds the model's weights in plaintext; use a directory under /run or remove "
                f"{c.option} (docs/profiles.md)"
            )


def profile_cache_dirs(profile: Profile, *, mounts: str | None = None) -> list[CacheDir]:
    """The model caches of every candidate in ``profile``, both formats."""
    return cache_dirs(tuple(profile.candidates("onnx")) + tuple(profile.candidates("tflite")), mounts=mounts)

