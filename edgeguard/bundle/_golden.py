"""Golden vectors: the ``.npz`` the publisher passes to ``pack --golden`` and the samples a device gets back.

Format: keys ``"<i>/in/<input name>"`` and ``"<i>/out/<output name>"`` for sample ``i = 0..N-1``.
On the device, ``decode_golden`` only ever receives bytes that ``_open`` has already authenticated
(signed chunk digests + GCM tags); it still bounds what it reads, because a signed file can be a mistake.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from edgeguard._echo import echo
from edgeguard.bundle._format import BundleLimits
from edgeguard.bundle.manifest import TENSOR_DTYPES, GoldenSample, Manifest
from edgeguard.errors import BundleRejected

__all__ = ["decode_golden", "encode_golden", "split_golden_keys"]

_KEY = re.compile(r"(0|[1-9][0-9]{0,4})/(in|out)/(.{1,256})\Z", re.DOTALL)


def split_golden_keys(keys: list[str]) -> dict[int, dict[str, dict[str, str]]]:
    """Group npz keys into {sample: {"in": {name: key}, "out": {name: key}}}; ValueError on a bad key."""
    samples: dict[int, dict[str, dict[str, str]]] = {}
    for key in keys:
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"golden key {echo(key)} is not '<i>/in/<name>' or '<i>/out/<name>'")
        i, side, name = int(match.group(1)), match.group(2), match.group(3)
        samples.setdefault(i, {"in": {}, "out": {}})[side][name] = key
    if sorted(samples) != list(range(len(samples))):
        raise ValueError("golden samples must be numbered 0..N-1 without gaps")
    return samples


def encode_golden(samples: list[GoldenSample]) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        for side, tensors in (("in", s.inputs), ("out", s.outputs)):
            for name, value in tensors.items():
                arrays[f"{i}/{side}/{name}"] = np.ascontiguousarray(value)
    buf = io.BytesIO()
    # No allow_pickle argument: numpy < 2.1 has none and stores it as one more array named "allow_pickle",
    # which the decoder then refuses (packing failed on numpy 1.x). Pickles are kept out on the way back in:
    # decode_golden loads with allow_pickle=False, and pack runs it before sealing.
    np.savez(buf, **cast("dict[str, Any]", arrays))  # the stubs read **arrays as allow_pickle=
    return buf.getvalue()


def _frozen(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    for a in arrays.values():
        a.setflags(write=False)
    return dict(arrays)


def _check_declared_sizes(archive: zipfile.ZipFile, budget: int) -> None:
    """numpy allocates an array from the shape in its .npy header before reading the data: bound the sum of
    declared sizes first, so a wrong header cannot ask for more memory than the golden-vector limit."""
    for info in archive.infolist():
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        # Tensors only: a zero-width dtype would let any shape pass the size bound below, and text, structured
        # or object arrays are nothing a model takes or returns.
        if dtype.name not in TENSOR_DTYPES:
            raise ValueError(f"{info.filename}: dtype {dtype} is not a tensor dtype")
        count = 1
        for dim in shape:
            if dim < 0:
                raise ValueError(f"negative dimension in {info.filename}")
            count *= dim
        budget -= count * dtype.itemsize
        if budget < 0:
            raise BundleRejected("too large", "golden vectors declare arrays beyond the limit")


def decode_golden(data: bytearray, manifest: Manifest, limits: BundleLimits) -> tuple[GoldenSample, ...]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            infos = npz.zip.infolist()
            # Bound what decompression may produce (savez_compressed is allowed) before reading any array.
            if len(infos) > 4096 or sum(i.file_size for i in infos) > limits.max_golden_bytes:
                raise BundleRejected("too large", "golden vectors expand beyond the limit")
            samples = split_golden_keys(list(npz.files))
            _check_declared_sizes(npz.zip, limits.max_golden_bytes)
            out = []
            for i in range(len(samples)):
                s = samples[i]
                if not s["in"] or not s["out"]:
                    raise ValueError(f"golden sample {i} needs both inputs and outputs")
                out.append(
                    GoldenSample(
                        inputs=_frozen({n: npz[k] for n, k in s["in"].items()}),
                        outputs=_frozen({n: npz[k] for n, k in s["out"].items()}),
                    )
                )
    except BundleRejected:
        raise
    # zipfile raises NotImplementedError (a RuntimeError) for an unknown compression method, RuntimeError
    # for an encrypted member and zlib.error for a corrupt deflate stream: all verdicts on the file.
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, zlib.error, zipfile.BadZipFile) as exc:
        raise BundleRejected("malformed", f"golden vectors: {exc}") from None
    if len(out) != manifest.golden_count:
        raise BundleRejected(
            "malformed", f"manifest says {manifest.golden_count} golden samples, found {len(out)}"
        )
    return tuple(out)
