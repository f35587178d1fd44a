"""Opening reads every byte once and uses only what it checked: a file rewritten during the open cannot
slip in unchecked bytes. Also the digest-only pass of ``verify_bundle`` and the thread setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard.bundle import BundleLimits, _open, open_bundle, verify_bundle
from edgeguard.errors import BundleRejected
from tests.bundle.conftest import Forge, Party, body_offset, split


def _spy_reads(monkeypatch: pytest.MonkeyPatch, after_read: object) -> list[tuple[int, int]]:
    """Record every range read from a bundle file; call ``after_read(offset, n)`` right after each read."""
    ranges: list[tuple[int, int]] = []
    real = _open._Source._read_into

    def spy(self: _open._Source, buf: memoryview, offset: int) -> None:
        real(self, buf, offset)
        ranges.append((offset, offset + len(buf)))
        after_read(offset, len(buf))  # type: ignore[operator]

    monkeypatch.setattr(_open._Source, "_read_into", spy)
    return ranges


@pytest.mark.parametrize("threads", [1, 4])
def test_every_byte_is_read_once_and_rewriting_it_afterwards_changes_nothing(
    *,
    party: Party,
    tiny_bundle: bytes,
    tiny_model: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    path = tmp_path / "b.egm"
    path.write_bytes(tiny_bundle)
    evil = bytes(b ^ 0xA5 for b in tiny_bundle)

    def overwrite(offset: int, n: int) -> None:  # whatever was just read is replaced on disk at once
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(evil[offset : offset + n])

    ranges = _spy_reads(monkeypatch, overwrite)
    opened = open_bundle(
        path,
        trust=party.trust,
        device_key=party.device,
        state_dir=None,
        limits=BundleLimits(max_open_threads=threads),
    )
    assert opened.model == tiny_model  # decrypted from the copies that were checked, never re-read
    assert path.read_bytes() == evil  # the whole file really was rewritten behind the reader
    covered = 0
    for start, end in sorted(ranges):
        assert start == covered, "a byte was read twice or skipped"
        covered = end
    assert covered == len(tiny_bundle)


def test_file_swapped_after_the_index_was_read_is_rejected(
    party: Party, tiny_bundle: bytes, forge: Forge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced by another bundle validly signed by the same publisher (one chunk differs)
    right after the signed index was read: the new chunk does not match the table already checked."""
    path = tmp_path / "b.egm"
    path.write_bytes(tiny_bundle)
    chunks = split(tiny_bundle).model_chunks
    changed = bytearray(chunks[2])
    changed[7] ^= 1
    other = forge(tiny_bundle, lambda p: p.with_model_chunks([*chunks[:2], bytes(changed), *chunks[3:]]))
    assert len(other) == len(tiny_bundle)
    verify_bundle(other, trust=party.trust)  # validly signed: every chunk matches its own table
    index_at = body_offset(tiny_bundle)

    def swap(offset: int, n: int) -> None:
        if offset == index_at:
            path.write_bytes(other)

    _spy_reads(monkeypatch, swap)
    with pytest.raises(BundleRejected, match="chunk 2 of stream 2 does not match its signed digest"):
        open_bundle(path, trust=party.trust, device_key=party.device, state_dir=None)


def test_file_shrinking_during_open_is_rejected(
    party: Party, tiny_bundle: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.egm"
    path.write_bytes(tiny_bundle)
    index_at = body_offset(tiny_bundle)

    def shrink(offset: int, n: int) -> None:
        if offset == index_at:
            path.write_bytes(tiny_bundle[: len(tiny_bundle) // 2])

    _spy_reads(monkeypatch, shrink)
    with pytest.raises(BundleRejected, match="changed while it was being read"):
        open_bundle(path, trust=party.trust, device_key=party.device, state_dir=None)


def test_mutable_in_memory_sources_are_copied_before_use(
    party: Party, tiny_bundle: bytes, tiny_model: bytes
) -> None:
    for source in (bytearray(tiny_bundle), memoryview(bytearray(tiny_bundle))):
        opened = open_bundle(source, trust=party.trust, device_key=party.device, state_dir=None)  # type: ignore[arg-type]
        assert opened.model == tiny_model


def test_verify_checks_every_chunk_digest_without_decrypting(
    party: Party, tiny_bundle: bytes, forge: Forge
) -> None:
    verify_bundle(tiny_bundle, trust=party.trust)
    last = len(tiny_bundle) - 1
    broken = tiny_bundle[:last] + bytes([tiny_bundle[last] ^ 1])
    n = len(split(tiny_bundle).model_chunks)
    with pytest.raises(BundleRejected, match=f"chunk {n - 1} of stream 2 does not match its signed digest"):
        verify_bundle(broken, trust=party.trust)
    # A publisher-signed table over a chunk that fails GCM passes verify (it decrypts nothing) and is
    # refused by open: verify answers "is this the file the publisher signed", open also "does it decrypt".
    chunks = split(tiny_bundle).model_chunks
    bad = bytearray(chunks[0])
    bad[0] ^= 1
    resigned = forge(tiny_bundle, lambda p: p.with_model_chunks([bytes(bad), *chunks[1:]]))
    verify_bundle(resigned, trust=party.trust)
    with pytest.raises(BundleRejected, match="chunk 0 of stream 2 failed authentication"):
        open_bundle(resigned, trust=party.trust, device_key=party.device, state_dir=None)


def test_open_threads_setting() -> None:
    with pytest.raises(ValueError, match="max_open_threads"):
        BundleLimits(max_open_threads=0)
    with pytest.raises(ValueError, match="max_open_threads"):
        BundleLimits(max_open_threads=65)
    assert BundleLimits(max_open_threads=1).open_threads() == 1
    assert 1 <= BundleLimits(max_open_threads=64).open_threads() <= 64


def test_scratch_buffers_stay_within_a_tenth_of_the_model(
    party: Party, tiny_bundle: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread of a file open owns one chunk-sized scratch buffer; for a small model (37 kB in 4 kB
    chunks) a tenth of the model holds none of them beyond the first, so one thread does it all. Bytes
    need no scratch and use the threads they are given."""
    import threading

    started: list[threading.Thread] = []

    class Counting(threading.Thread):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(threading, "Thread", Counting)
    path = tmp_path / "b.egm"
    path.write_bytes(tiny_bundle)
    limits = BundleLimits(max_open_threads=4)
    open_bundle(path, trust=party.trust, device_key=party.device, state_dir=None, limits=limits)
    assert started == []
    open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None, limits=limits)
    assert len(started) == min(4, limits.open_threads()) - 1
