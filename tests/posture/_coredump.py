"""Finding a model's plaintext in a core file: every run of at least ``window`` bytes that the core shares
with the model, wherever it lies in either of them."""

from __future__ import annotations

import numpy as np

_K = np.uint64(0x9E3779B97F4A7C15)  # an odd multiplier mixes the second word into the key


def _keys(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(first ^ (second * _K), dtype=np.uint64)


def plaintext_windows(core: bytes, model: bytes, window: int = 64) -> int:
    """How many places in ``core`` hold ``window`` or more contiguous bytes of ``model``.

    Every such run contains a 16-byte block that starts at a multiple of 16 in the core, so the core is cut
    into aligned 16-byte blocks and the model's 16-byte windows are taken at every offset; each common block
    is then extended both ways byte by byte. Runs made of one repeated 8-byte word (zero fill, padding) are
    not plaintext anyone could use and would match everywhere, so they are skipped.
    """
    if len(core) < 16 or len(model) < window:
        return 0
    c = np.frombuffer(core, dtype=np.uint64, count=len(core) // 16 * 2).reshape(-1, 2)
    keep = c[:, 0] != c[:, 1]
    core_pos = np.nonzero(keep)[0] * 16
    core_keys = _keys(c[keep, 0], c[keep, 1])
    order = np.argsort(core_keys, kind="stable")
    core_keys, core_pos = core_keys[order], core_pos[order]
    found: set[int] = set()  # diagonals (core offset - model offset) that hold a long enough run
    for shift in range(8):
        words = np.frombuffer(model, dtype=np.uint64, offset=shift, count=(len(model) - shift) // 8)
        a, b = words[:-1], words[1:]
        keys = _keys(a, b)
        hit = np.nonzero((a != b) & np.isin(keys, core_keys))[0]
        for j in hit[:20000]:
            m = shift + 8 * int(j)
            lo = np.searchsorted(core_keys, keys[j], side="left")
            hi = np.searchsorted(core_keys, keys[j], side="right")
            for cpos in core_pos[lo : min(hi, lo + 8)]:
                c = int(cpos)
                if c - m not in found and _run_through(core, model, c, m, window) >= window:
                    found.add(c - m)  # one shared run lies on one diagonal (core offset - model offset)
    return len(found)


def _run_through(core: bytes, model: bytes, c: int, m: int, window: int) -> int:
    """Length of the shared run through the 16 equal bytes at core ``c`` / model ``m``, counted up to
    ``window`` bytes either side (enough to decide, and bounded)."""
    back = 0
    while back < window and c - back > 0 and m - back > 0 and core[c - back - 1] == model[m - back - 1]:
        back += 1
    fwd = 16
    end = min(16 + window, len(core) - c, len(model) - m)
    while fwd < end and core[c + fwd] == model[m + fwd]:
        fwd += 1
    return back + fwd
