"""The core-file search finds planted plaintext (so the crash tests can fail) and ignores filler."""

from __future__ import annotations

import os

from tests.posture._coredump import plaintext_windows


def test_finds_a_64_byte_window_at_any_offset_and_nothing_shorter() -> None:
    model = os.urandom(100_000)
    for offset in (0, 1, 7, 13, 4093):
        core = bytearray(os.urandom(300_000))
        core[offset + 5000 : offset + 5000 + 64] = model[777 : 777 + 64]
        assert plaintext_windows(bytes(core), model) == 1, offset
        core[offset + 5000 + 63] ^= 0xFF  # one byte short of a window
        assert plaintext_windows(bytes(core), model) == 0, offset


def test_whole_model_in_a_core_is_found_and_zero_fill_is_not_plaintext() -> None:
    model = bytes(4096) + os.urandom(50_000) + bytes(4096)
    core = os.urandom(10_000) + model + bytes(100_000)
    assert plaintext_windows(core, model) == 1
    assert plaintext_windows(bytes(200_000), model) == 0
