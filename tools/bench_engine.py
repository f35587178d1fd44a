#!/usr/bin/env python3
"""EdgeGuard engine vs raw onnxruntime / LiteRT: throughput and cold-start ratios (same as `edgeguard bench`).

    python tools/bench_engine.py [--quick] [--only yolov8n] [--json]
"""

from __future__ import annotations

import sys

from edgeguard.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
