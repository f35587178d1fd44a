"""Reading a small file from a place others might write: the pattern of ``edgeguard.keys._read_key_file``.

Open once without following a link (``O_NOFOLLOW``) and without blocking on a FIFO (``O_NONBLOCK``),
``fstat`` that descriptor, accept a regular file only, and read at most ``limit`` bytes: a path swapped
after a check, a link to somewhere else, or a file grown to gigabytes cannot slip through.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["read_small_file"]


def read_small_file(path: Path, *, limit: int) -> bytes:
    """The bytes of ``path``; ``OSError`` (with a readable ``strerror``) when it is missing, a link, not a
    regular file, or larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > limit:
            raise OSError(0, f"larger than {limit} bytes")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew after the fstat
        raise OSError(0, f"larger than {limit} bytes")
    return data
