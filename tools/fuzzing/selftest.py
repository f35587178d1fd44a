"""Targets that fail on their first seed, one per kind of finding. tests/fuzz runs them to check that the
runner reports each kind, so that a green short run means something. Never part of a default run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import Harness, Target

__all__ = ["SELFTESTS", "target"]


def _selftest(kind: str) -> Callable[[Path], Harness]:

    def build(_scratch: Path) -> Harness:
        def one_input(data: bytes) -> None:
            if data == b"crash":
                raise KeyError("selftest")
            if data == b"hang":
                while True:
                    pass
            if data == b"alloc":
                bytearray(512 * 1024 * 1024)

        return Harness(one_input, (kind.encode(),), max_len=16, headroom_mb=64)

    return build


SELFTESTS: tuple[Target, ...] = tuple(
    Target(f"selftest-{k}", f"the runner's {k} detection", "none", _selftest(k))
    for k in ("crash", "hang", "alloc")
)


def target(name: str) -> Target:
    for t in SELFTESTS:
        if t.name == name:
            return t
    raise KeyError(name)
