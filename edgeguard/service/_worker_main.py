"""The worker process's entry point: ``python -m edgeguard.service._worker_main -c CONFIG ...``.

A module of its own because runpy executes the ``-m`` module after importing its package: had the
supervisor started ``-m edgeguard.service._worker``, a module the package may have imported already, Python
would run a second copy of it next to the first (and warn on every worker start). Nothing imports this one.
"""

from __future__ import annotations

import sys

from ._worker import main

if __name__ == "__main__":
    sys.exit(main())
