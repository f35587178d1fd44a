"""Benchmark harnesses (``edgeguard bench``, tools/bench_*.py): a place of their own, outside the runtime.

They seal models with throwaway keys and quantize them, so they import the bundle packer and the quantizer,
which a device's runtime (the engine, the service) never needs. See docs/engine.md ("bench").
"""

from __future__ import annotations

from ._engine import TARGETS, Case, run_benchmarks

__all__ = ["TARGETS", "Case", "run_benchmarks"]
