"""Moved to :mod:`edgeguard.bench` (the harness packs and quantizes models; the runtime's engine does not).

Kept so existing imports (``edgeguard.engine._bench``) keep working: this name is an alias of the moved
module itself (the same module object), so setting one of its attributes sets it where the code reads it.
"""

from __future__ import annotations

import sys

from edgeguard.bench import _engine
from edgeguard.bench._engine import TARGETS, Case, run_benchmarks  # what type checkers see here

__all__ = ["TARGETS", "Case", "run_benchmarks"]

sys.modules[__name__] = _engine
