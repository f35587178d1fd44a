"""Zeroing secrets held in Python buffers (best effort).

``memset`` on the buffer's own storage is ~10x faster than assigning a zero ``bytes`` of the same size, and it
allocates nothing, so wiping a 12 MB plaintext model costs about a millisecond. It cannot reach copies made
elsewhere (a backend's own copy, swapped-out pages): see docs/bundle.md on what wiping does and does not do.
"""

from __future__ import annotations

import ctypes

__all__ = ["wipe"]


def wipe(buf: bytearray) -> None:
    """Overwrite every byte of ``buf`` with zero, in place."""
    if buf:
        ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))
