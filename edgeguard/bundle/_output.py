"""The manifest's ``output`` declaration (output hardening), read from the manifest JSON during the bundle's
opening (``_open._parse_unverified_manifest`` calls it before the signature is checked, like every other
field; nothing acts on it before the signature verifies). Strict: an unknown key, a wrong type or a value
out of range makes the bundle ``malformed`` (the publisher's ``pack`` runs the same check)."""

from __future__ import annotations

import math
from typing import Any, NoReturn

from edgeguard.bundle.manifest import NoiseSpec, OutputPolicy
from edgeguard.errors import BundleRejected

__all__ = ["parse_unverified_output", "MAX_TOP_K", "MAX_DECIMALS", "MAX_NOISE_SCALE"]

MAX_TOP_K = 1000
MAX_DECIMALS = 6
MAX_NOISE_SCALE = 1.0  # in score units: more than this would drown any score in [0, 1]
_KEYS = frozenset({"top_k", "round_decimals", "raw_logits", "noise"})


def _bad(detail: str) -> NoReturn:
    raise BundleRejected("malformed", f"manifest: output.{detail}")


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    if key not in d:
        return None
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:  # type() excludes bool
        _bad(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def parse_unverified_output(value: Any, *, has_postprocess: bool, outputs: int) -> OutputPolicy | None:
    """The typed policy from the manifest's ``output`` value (``None``: not declared)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BundleRejected("malformed", "manifest: output must be an object")
    unknown = set(value) - _KEYS
    if unknown:
        _bad(f"{sorted(unknown)[0][:64]}: unknown key")
    raw = value.get("raw_logits", False)
    if type(raw) is not bool:
        _bad("raw_logits must be true or false")
    noise = None
    if "noise" in value:
        n = value["noise"]
        if not isinstance(n, dict) or set(n) != {"kind", "scale"}:
            _bad("noise must be an object with kind and scale")
        if n["kind"] not in ("laplace", "gaussian"):
            _bad("noise.kind must be 'laplace' or 'gaussian'")
        scale = n["scale"]
        if type(scale) not in (int, float) or not math.isfinite(scale) or not 0 < scale <= MAX_NOISE_SCALE:
            _bad(f"noise.scale must be a number in (0, {MAX_NOISE_SCALE:g}]")
        noise = NoiseSpec(kind=n["kind"], scale=float(scale))
    policy = OutputPolicy(
        top_k=_int(value, "top_k", 1, MAX_TOP_K),
        round_decimals=_int(value, "round_decimals", 0, MAX_DECIMALS),
        raw_logits=raw,
        noise=noise,
    )
    if policy.top_k is not None and not has_postprocess and outputs != 1:
        # Without a postprocess declaration top-k is taken over the model's only output.
        _bad("top_k without a postprocess declaration needs a model with exactly one output")
    if not raw and not has_postprocess and policy.top_k is None:
        _bad("raw_logits = false needs a postprocess declaration or top_k: nothing would be left to report")
    return policy
