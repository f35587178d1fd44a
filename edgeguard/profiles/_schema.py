"""Typed, frozen device profiles and the strict reader that builds them from TOML tables.

A device profile is trusted configuration, but a typo in it must never silently fall back to the CPU: every
table, key and option name is checked against the schema below, and the error names the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from edgeguard.errors import ConfigError

__all__ = [
    "OptionValue",
    "Accelerator",
    "Detection",
    "EngineTuning",
    "Profile",
    "ONNX_KINDS",
    "TFLITE_KINDS",
    "profile_from_table",
]

OptionValue = str | int | float | bool

# Per model format: accelerator kind -> {option name: accepted python type}. Names are EdgeGuard's own (stable
# across library versions); the backends translate them into provider/delegate options.
_ONNX_COMMON: Final[dict[str, type]] = {"graph_optimization": str}
ONNX_KINDS: Final[dict[str, dict[str, type]]] = {
    "tensorrt": {
        "device_id": int,
        "fp16": bool,
        "int8": bool,
        "engine_cache_path": str,
        "timing_cache_path": str,
        "workspace_mb": int,
        "int8_calibration_table": str,
        "dla_core": int,
    },
    "cuda": {"device_id": int, "gpu_mem_limit_mb": int, "cudnn_conv_algo_search": str},
    "openvino": {"device_type": str, "precision": str, "cache_dir": str, "num_streams": int},
    "acl": {"fast_math": bool},
    "armnn": {"fast_math": bool},
    "xnnpack": {},
    "cpu": {"arena": bool},
}
TFLITE_KINDS: Final[dict[str, dict[str, type]]] = {
    "edgetpu": {"device": str, "library": str},
    "gpu": {"library": str, "delegate_options": dict},
    "external": {"library": str, "delegate_options": dict},
    "xnnpack": {},
    "builtin": {},
}
GRAPH_OPTIMIZATIONS: Final[frozenset[str]] = frozenset({"disable", "basic", "extended", "all"})


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a table",
            list: "a list"}.get(
        t, t.__name__
    )


def _check_type(where: str, key: str, value: object, expected: type) -> None:
    # bool is a subclass of int in Python; a profile that writes `threads = true` is a mistake, not 1.
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {_type_name(expected)}, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class Accelerator:
    """One fast-path candidate: which provider or delegate, with which options, in which order."""

    kind: str
    label: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    threads: int | None = None

    def __post_init__(self) -> None:
        # Frozen all the way down: a caller's dict must not change a validated candidate afterwards.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if not self.label:
            raise ValueError("accelerator label must not be empty")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise ValueError(f"accelerator threads must be 1..256, got {self.threads}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "options": dict(self.options),
                "threads": self.threads}


@dataclass(frozen=True, kw_only=True)
class Detection:
    """How to recognise the board. Every non-empty rule must match; within a rule any entry may match
    (``cpu_flags``: all flags must be present)."""

    arch: tuple[str, ...] = ()
    device_tree_model: tuple[str, ...] = ()  # substrings of /proc/device-tree/model
    nv_tegra_release: tuple[str, ...] = ()  # substrings of /etc/nv_tegra_release
    cpu_flags: tuple[str, ...] = ()  # all must appear in /proc/cpuinfo flags/Features
    usb_ids: tuple[str, ...] = ()  # "vvvv:pppp" of a device under /sys/bus/usb/devices
    paths: tuple[str, ...] = ()  # any of these exists (e.g. /dev/apex_0)


@dataclass(frozen=True, kw_only=True)
class EngineTuning:
    """Runtime knobs of the fast path that depend on the board."""

    run_timeout_ms: int | None = None  # a run slower than this demotes the accelerator
    promote_after_s: float = 60.0  # cool-down before a demoted accelerator is self-tested again
    standby: int = 1  # fallback candidates kept loaded (the plaintext is wiped after load)

    def __post_init__(self) -> None:
        if self.run_timeout_ms is not None and not 1 <= self.run_timeout_ms <= 600_000:
            raise ValueError(f"run_timeout_ms must be 1..600000, got {self.run_timeout_ms}")
        if not 0.0 <= self.promote_after_s <= 86_400.0:
            raise ValueError(f"promote_after_s must be 0..86400, got {self.promote_after_s}")
        if not 0 <= self.standby <= 8:
            raise ValueError(f"standby must be 0..8, got {self.standby}")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A validated device profile."""

    name: str
    description: str
    priority: int
    threads: int
    detect: Detection
    onnx: tuple[Accelerator, ...]
    tflite: tuple[Accelerator, ...]
    engine: EngineTuning = field(default_factory=EngineTuning)
    thermal_zones: tuple[str, ...] = ()
    watchdog_device: str | None = None
    watchdog_timeout_s: int = 15
    serial_port: str | None = None
    serial_baudrate: int = 115200
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not 0 <= self.threads <= 256:
            raise ValueError(f"threads must be 0..256 (0: one per CPU core), got {self.threads}")
        if not 1 <= self.watchdog_timeout_s <= 3600:
            raise ValueError(f"watchdog_timeout_s must be 1..3600, got {self.watchdog_timeout_s}")
        if not 50 <= self.serial_baudrate <= 4_000_000:
            raise ValueError(f"serial_baudrate must be 50..4000000, got {self.serial_baudrate}")

    @property
    def effective_threads(self) -> int:
        """``threads``, with 0 meaning one per CPU core this process may use."""
        if self.threads:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - non-Linux
            return os.cpu_count() or 1

    def candidates(self, model_format: str) -> tuple[Accelerator, ...]:
        """The ordered fast-path candidates for a model format (``onnx`` or ``tflite``)."""
        if model_format == "onnx":
            return self.onnx
        if model_format == "tflite":
            return self.tflite
        raise ValueError(f"unknown model format {model_format!r}")


# --- strict reader ------------------------------------------------------------------------------------------

_TOP: Final = {"profile", "detect", "engine", "accelerators", "thermal", "watchdog", "serial"}
_PROFILE: Final[dict[str, type]] = {"name": str, "description": str, "priority": int, "threads": int}
_DETECT: Final[dict[str, type]] = {
    "arch": list, "device_tree_model": list, "nv_tegra_release": list, "cpu_flags": list, "usb_ids": list,
    "paths": list,
}
_ENGINE: Final[dict[str, type]] = {"run_timeout_ms": int, "promote_after_s": float, "standby": int}
_THERMAL: Final[dict[str, type]] = {"zones": list}
_WATCHDOG: Final[dict[str, type]] = {"device": str, "timeout_s": int}
_SERIAL: Final[dict[str, type]] = {"port": str, "baudrate": int}
_ACCEL: Final[dict[str, type]] = {"kind": str, "label": str, "threads": int, "options": dict}


def _table(where: str, name: str, raw: Mapping[str, Any], schema: Mapping[str, type]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            raise ConfigError(f"{where}: unknown key '{name}.{key}' (known: {', '.join(sorted(schema))})")
        _check_type(where, f"{name}.{key}", value, schema[key])
        out[key] = value
    return out


def _strings(where: str, key: str, value: list[Any]) -> tuple[str, ...]:
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: key {key!r} must be a list of strings, got {type(item).__name__}")
    return tuple(value)


def _sub(where: str, raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
    return value


def _accelerator(where: str, fmt: str, index: int, raw: object) -> Accelerator:
    name = f"accelerators.{fmt}[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{name}' must be a table")
    t = _table(where, name, raw, _ACCEL)
    kinds = ONNX_KINDS if fmt == "onnx" else TFLITE_KINDS
    kind = t.get("kind")
    if kind is None:
        raise ConfigError(f"{where}: '{name}.kind' is required")
    if kind not in kinds:
        raise ConfigError(f"{where}: '{name}.kind' = {kind!r} is not a {fmt} accelerator "
                          f"(known: {', '.join(sorted(kinds))})")
    schema = dict(kinds[kind])
    if fmt == "onnx":
        schema.update(_ONNX_COMMON)
    options = _table(where, f"{name}.options", t.get("options", {}), schema)
    if options.get("graph_optimization", "all") not in GRAPH_OPTIMIZATIONS:
        raise ConfigError(f"{where}: '{name}.options.graph_optimization' must be one of "
                          f"{', '.join(sorted(GRAPH_OPTIMIZATIONS))}")
    for key in ("delegate_options",):
        if key in options:
            for sub_key, sub_value in options[key].items():
                if not isinstance(sub_value, str | int | float | bool):
                    raise ConfigError(f"{where}: '{name}.options.{key}.{sub_key}' must be a scalar")
            options[key] = MappingProxyType(dict(options[key]))
    if kind == "external" and "library" not in options:
        raise ConfigError(f"{where}: '{name}.options.library' is required for an external delegate")
    try:
        return Accelerator(kind=kind, label=t.get("label", kind), options=MappingProxyType(options),
                           threads=t.get("threads"))
    except ValueError as exc:
        raise ConfigError(f"{where}: '{name}': {exc}") from None


def profile_from_table(raw: Mapping[str, Any], *, source: str) -> Profile:
    """Validate one parsed TOML document into a :class:`Profile` (``ConfigError`` naming ``source`` + key)."""
    where = source
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"{where}: unknown table '{key}' (known: {', '.join(sorted(_TOP))})")
    prof = _table(where, "profile", _sub(where, raw, "profile"), _PROFILE)
    for required in ("name", "threads"):
        if required not in prof:
            raise ConfigError(f"{where}: 'profile.{required}' is required")
    det = _table(where, "detect", _sub(where, raw, "detect"), _DETECT)
    detect = Detection(**{k: _strings(where, f"detect.{k}", v) for k, v in det.items()})
    accels = _sub(where, raw, "accelerators")
    for key in accels:
        if key not in ("onnx", "tflite"):
            raise ConfigError(f"{where}: unknown key 'accelerators.{key}' (known: onnx, tflite)")
    chains: dict[str, tuple[Accelerator, ...]] = {}
    for fmt in ("onnx", "tflite"):
        entries = accels.get(fmt, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: 'accelerators.{fmt}' must be an array of tables "
                              f"([[accelerators.{fmt}]])")
        chain = tuple(_accelerator(where, fmt, i, e) for i, e in enumerate(entries))
        labels = [a.label for a in chain]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: 'accelerators.{fmt}' labels must be unique, got {labels}")
        chains[fmt] = chain
    eng = _table(where, "engine", _sub(where, raw, "engine"), _ENGINE)
    thermal = _table(where, "thermal", _sub(where, raw, "thermal"), _THERMAL)
    wd = _table(where, "watchdog", _sub(where, raw, "watchdog"), _WATCHDOG)
    serial = _table(where, "serial", _sub(where, raw, "serial"), _SERIAL)
    try:
        return Profile(
            name=prof["name"],
            description=prof.get("description", ""),
            priority=prof.get("priority", 0),
            threads=prof["threads"],
            detect=detect,
            onnx=chains["onnx"],
            tflite=chains["tflite"],
            engine=EngineTuning(
                run_timeout_ms=eng.get("run_timeout_ms"),
                promote_after_s=float(eng.get("promote_after_s", 60.0)),
                standby=eng.get("standby", 1),
            ),
            thermal_zones=_strings(where, "thermal.zones", thermal.get("zones", [])),
            watchdog_device=wd.get("device"),
            watchdog_timeout_s=wd.get("timeout_s", 15),
            serial_port=serial.get("port"),
            serial_baudrate=serial.get("baudrate", 115200),
            source=source,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
