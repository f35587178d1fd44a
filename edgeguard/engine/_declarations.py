"""Strict readers for the JSON declarations a manifest carries (preprocess, postprocess, input_stats).

The declarations are signed by the publisher, so they are trusted, but they are still validated field by
field: an unknown key or a wrong type is a publisher mistake that must fail at load with a message naming
the field, never silently fall back to a default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgeguard.errors import ConfigError

__all__ = ["DeclReader"]


class DeclReader:
    """Reads one JSON object: every read names its key, ``finish()`` refuses keys nobody read."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.where = where
        self._data: Mapping[str, Any] = data
        self._seen: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self._data

    def _raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._data[key]

    def fail(self, key: str, detail: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: {detail}")

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {unknown[0]!r}")

    def string(self, key: str, default: str | None = None, *, choices: Sequence[str] = ()) -> str:
        if key not in self._data:
            if default is None:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self._raw(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def number(self, key: str, default: float | None = None, *, low: float, high: float) -> float:
        if key not in self._data:
            if default is None:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value!r} is outside [{low:g}, {high:g}]")
        return float(value)

    def integer(self, key: str, default: int | None = None, *, low: int, high: int) -> int:
        if key not in self._data:
            if default is None:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is outside [{low}, {high}]")
        return value

    def nullable_integer(self, key: str, *, low: int, high: int) -> int | None:
        """An integer that may be ``null`` or absent (both mean ``None``)."""
        if key in self._data and self._data[key] is None:
            self._seen.add(key)
            return None
        if key not in self._data:
            return None
        return self.integer(key, low=low, high=high)

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self._data:
            return default
        value = self._raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def numbers(self, key: str, default: Sequence[float] | None, *, length: int | None = None,
                low: float = -1e30, high: float = 1e30) -> tuple[float, ...]:
        if key not in self._data:
            if default is None:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return tuple(default)
        value = self._raw(key)
        if not isinstance(value, list) or (length is not None and len(value) != length):
            want = f"a list of {length} numbers" if length is not None else "a list of numbers"
            raise self.fail(key, f"expected {want}, got {value!r}")
        out: list[float] = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise self.fail(key, f"expected finite numbers, got {item!r}")
            if not low <= item <= high:
                raise self.fail(key, f"{item!r} is outside [{low:g}, {high:g}]")
            out.append(float(item))
        return tuple(out)

    def strings(self, key: str, *, max_items: int = 100_000, max_len: int = 256) -> tuple[str, ...] | None:
        if key not in self._data:
            return None
        value = self._raw(key)
        if not isinstance(value, list) or len(value) > max_items:
            raise self.fail(key, f"expected a list of at most {max_items} strings")
        for item in value:
            if not isinstance(item, str) or len(item) > max_len:
                raise self.fail(key, f"expected strings of at most {max_len} characters, got {item!r}")
        return tuple(value)

    def raw_list(self, key: str, *, max_items: int) -> list[Any]:
        """A JSON list of at most ``max_items`` items, unvalidated (the caller reads each one)."""
        value = self._raw(key)
        if not isinstance(value, list) or len(value) > max_items:
            raise self.fail(key, f"expected a list of at most {max_items} items, got {value!r}"[:300])
        return value

    def obj(self, key: str) -> DeclReader | None:
        if key not in self._data:
            return None
        return DeclReader(f"{self.where}.{key}", self._raw(key))
