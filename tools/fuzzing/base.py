"""What a fuzz target is: kept free of EdgeGuard imports, so the runner's self-tests start in a blink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Harness", "Target"]


@dataclass(frozen=True)
class Harness:
    one_input: Callable[[bytes], None]
    seeds: tuple[bytes, ...]
    max_len: int  # longest input the fuzzer generates (at least the largest seed)
    headroom_mb: int = 96  # address space one input may add on top of what set-up left mapped
    close: Callable[[], None] = lambda: None  # releases what set-up started (threads, files)


@dataclass(frozen=True)
class Target:
    name: str
    parser: str  # the code under test, for the report
    refusal: str  # the documented error family
    build: Callable[[Path], Harness]  # gets a private scratch directory
