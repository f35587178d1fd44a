"""Publisher side of `pack --adversarial`: the `defence` declaration for a model, calibrated on clean data.

One CPU reference session (onnxruntime; LiteRT through ``run_reference`` for ``.tflite``) scores every clean
sample; ``edgeguard.engine._adv_calibrate.calibrate_adversarial`` turns the scores into the threshold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeguard.bundle._pack import _tensor_from_meta
from edgeguard.bundle._reference import introspect, run_reference
from edgeguard.bundle.manifest import ModelFormat
from edgeguard.engine._adv_calibrate import calibrate_adversarial
from edgeguard.engine.adversarial import MAX_SQUEEZERS, RunFn, SqueezerKind
from edgeguard.errors import ConfigError

from ._evaluate import probe_manifest

__all__ = ["adversarial_defence", "load_clean_samples", "parse_squeezer_list"]

_SQUEEZER_ITEM = re.compile(r"(bits|median)([0-9]{1,2})")


def parse_squeezer_list(text: str) -> list[tuple[SqueezerKind, int]]:
    """``"bits4,bits5,median2"`` -> ``[("bits", 4), ("bits", 5), ("median", 2)]`` (checked again at parse)."""
    out: list[tuple[SqueezerKind, int]] = []
    for item in (t.strip() for t in text.split(",")):
        m = _SQUEEZER_ITEM.fullmatch(item)
        if m is None:
            raise ConfigError(f"--adversarial-squeezers: {item[:40]!r} is not bitsN or medianK")
        out.append(("bits" if m.group(1) == "bits" else "median", int(m.group(2))))
    if not 1 <= len(out) <= MAX_SQUEEZERS:
        raise ConfigError(f"--adversarial-squeezers: 1 to {MAX_SQUEEZERS} squeezers, got {len(out)}")
    return out


def load_clean_samples(path: Path, input_names: Sequence[str], *, limit: int = 100_000,
                       ) -> list[dict[str, np.ndarray]]:
    """Clean samples from an .npz holding one array per model input, samples along the first axis."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in input_names if n not in npz.files]
            if missing:
                raise ConfigError(f"--adversarial-data {path}: no array for input {missing[0]!r} "
                                  f"(has {sorted(npz.files)})")
            arrays = {n: np.asarray(npz[n]) for n in input_names}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --adversarial-data {path}: {exc}") from None
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise ConfigError(f"--adversarial-data {path}: the arrays hold different numbers of samples")
    n = min(counts.pop(), limit)
    return [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(n)]


def adversarial_defence(
    model: bytes,
    model_format: ModelFormat,
    *,
    meta: Mapping[str, Any],
    samples: Sequence[Mapping[str, np.ndarray]],
    mode: Literal["flag", "reject"],
    fpr: float,
    bits: int = 4,
    median: int = 2,
    joint: bool = False,
    squeezers: Sequence[tuple[SqueezerKind, int]] | None = None,
) -> dict[str, Any]:
    """``meta["defence"]`` for ``model``: the detector calibrated on ``samples`` for ``fpr``."""
    if "inputs" in meta and "outputs" in meta:
        inputs = tuple(_tensor_from_meta(t, "inputs") for t in meta["inputs"])
        outputs = tuple(_tensor_from_meta(t, "outputs") for t in meta["outputs"])
    else:
        inputs, outputs = introspect(model, model_format)
    manifest = probe_manifest(inputs, outputs, meta.get("postprocess"))
    run: RunFn
    if model_format == "onnx":
        import onnxruntime as ort  # noqa: PLC0415 - heavy, publisher side only

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, dict(feed)), strict=True))
    else:
        def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return run_reference(model, model_format, feed)
    return calibrate_adversarial(run, samples, manifest=manifest, mode=mode, fpr=fpr, bits=bits,
                                 median=median, joint=joint, squeezers=squeezers)
