"""TOML tables -> frozen dataclasses, with a ConfigError that names the offending key.

Generic over the annotations of the target dataclass, so the outbox and link sections map straight onto
``OutboxConfig`` / ``LinkConfig`` from their packages without a second copy of their keys here.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from edgeguard._echo import ECHO_MAX_CHARS, cut, echo
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["SECRET_KEYS", "build", "load_toml"]

T = TypeVar("T")
MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KiB; anything near this is not one
# Keys whose value is a secret: never quoted in an error, and a file holding one must be private.
SECRET_KEYS = frozenset({"link.password"})


def load_toml(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed document and the file's permission bits (the caller refuses a group/other-readable file
    that holds a secret). Read like every file others may write: no link followed, regular file, bounded."""
    checked = read_checked(path, what="config", limit=MAX_CONFIG_BYTES, error=ConfigError)
    try:
        doc: dict[str, Any] = tomllib.loads(checked.data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {cut(exc)}") from None
    return doc, checked.mode


def build(cls: type[T], table: Any, section: str, **extra: Any) -> T:
    """An instance of the dataclass ``cls`` from ``table``; ``extra`` supplies fields TOML does not carry."""
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = dict(extra)
    for key, value in table.items():
        if key not in fields or key in extra:
            known = ", ".join(k for k in fields if k not in extra)
            raise ConfigError(f"{section}.{cut(key, ECHO_MAX_CHARS)}: unknown key (known: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None:  # TOML has no null; only reachable from defaults
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: wrong type")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {_shown(value, where)}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be an array")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_shown(value, where)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {_shown(value, where)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {_shown(value, where)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_shown(value, where)}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a path string, got {_shown(value, where)}")
        return Path(value)
    raise ConfigError(
        f"{where}: unsupported setting type {hint!r}"
    )  # pragma: no cover - a bug in a dataclass


def _shown(value: Any, where: str) -> str:
    return "(a secret, not shown)" if where in SECRET_KEYS else echo(value)
