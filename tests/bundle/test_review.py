"""Defects found in a security review of the bundle opener, each pinned by a test on a real, signed bundle."""

from __future__ import annotations

import io
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.bundle import _open, _rollback, open_bundle, pack_bundle
from edgeguard.bundle._rollback import RollbackFloor
from edgeguard.cli import main
from edgeguard.errors import BundleRejected
from tests.bundle.conftest import TINY_CHUNK, Forge, Parts, Party, seal, split


def _golden_zip(*, method: int | None = None, encrypted: bool = False) -> bytes:
    """A valid golden .npz with its member headers edited: another compression method, or "encrypted"."""
    buf = io.BytesIO()
    np.savez(buf, **{"0/in/x": np.ones((1, 96), np.float32), "0/out/y": np.ones((1, 96), np.float32)})
    raw = bytearray(buf.getvalue())
    # local headers: flags at +6, method at +8; central directory entries: flags at +8, method at +10
    for sig, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        i = raw.find(sig)
        while i >= 0:
            if method is not None:
                raw[i + method_at : i + method_at + 2] = struct.pack("<H", method)
            if encrypted:
                raw[i + flags_at] |= 1
            i = raw.find(sig, i + 4)
    return bytes(raw)


@pytest.mark.parametrize(
    "golden", [_golden_zip(method=99), _golden_zip(encrypted=True)], ids=["method", "enc"]
)
def test_signed_golden_zip_zipfile_cannot_read_is_a_rejection(
    party: Party, tiny_bundle: bytes, tiny_model: bytes, tmp_path: Path, golden: bytes, *, capsys: Any
) -> None:
    """zipfile raises NotImplementedError / RuntimeError for an unknown compression method or an encrypted
    member: that must be BundleRejected('malformed') (exit 3, one line), not an escaping RuntimeError."""
    m = split(tiny_bundle).manifest
    bad = seal(dict(m, golden_count=1), tiny_model, golden, key=party.publisher, to=party.recipient)
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bad, trust=party.trust, device_key=party.device, state_dir=None)
    assert exc.value.check == "malformed"
    path = tmp_path / "bad.egm"
    path.write_bytes(bad)
    rc = main(
        [
            "verify",
            str(path),
            "--trust",
            str(party.dir / "publisher.pub"),
            "--device-key",
            str(party.dir / "device.key"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("edgeguard: bundle rejected: malformed: golden vectors")
    assert err.count("\n") == 1


def test_concurrent_floor_commits_never_lower_the_floor(
    party: Party, tiny_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two opens committing v4 and v5 at once (service and `verify --commit`): whatever the interleaving,
    the floor ends at 5. Here the v4 commit has read the old floor and is about to write when the v5 commit
    runs; without mutual exclusion v4 then overwrites 5 and reopens the downgrade window."""

    def bundle(version: int) -> bytes:
        return pack_bundle(
            tiny_model,
            name="racy",
            version=version,
            sign_key=party.publisher,
            recipients=[party.recipient],
            chunk_size=TINY_CHUNK,
        )

    kw: dict[str, Any] = dict(
        trust=party.trust, device_key=party.device, state_dir=tmp_path, commit_floor=False
    )
    v4, v5 = open_bundle(bundle(4), **kw), open_bundle(bundle(5), **kw)
    real_write = _rollback.atomic_write
    other = threading.Thread(target=v5.commit_rollback_floor)
    calls = 0

    def interleaved(path: Path, data: bytes, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # v4 has read floor 0 and decided to write: let v5 run to completion (or block)
            other.start()
            other.join(timeout=1.0)
        real_write(path, data, **kwargs)

    monkeypatch.setattr(_rollback, "atomic_write", interleaved)
    v4.commit_rollback_floor()
    other.join(timeout=30)
    assert not other.is_alive()
    assert RollbackFloor(tmp_path).get("racy") == 5


def test_decrypted_golden_archive_is_zeroed_after_decoding(
    party: Party, tiny_bundle: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decrypted .npz (a plaintext buffer of its own) is not handed out: it is zeroed once decoded."""
    seen: list[bytearray] = []
    real = _open.decode_golden

    def spy(data: bytearray, *args: Any) -> Any:
        seen.append(data)
        return real(data, *args)

    monkeypatch.setattr(_open, "decode_golden", spy)
    opened = open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None)
    assert len(opened.golden) == 1 and opened.golden[0].outputs["y"].shape == (1, 96)
    assert (opened.golden[0].inputs["x"] == 1).all()  # the samples do not share the zeroed buffer
    assert len(seen) == 1 and len(seen[0]) > 0
    assert not any(seen[0])
    opened.wipe()


_READ_DEVICE = """
import resource, sys
from pathlib import Path
from edgeguard.errors import KeyFileError
from edgeguard.keys import load_trusted_key
# A tight address-space cap: an unbounded read of the device fails fast instead of eating the machine.
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 256 * 1024 * 1024,) * 2)
try:
    load_trusted_key(Path(sys.argv[1]))
except KeyFileError as exc:
    print("KeyFileError:", exc)
"""


def test_key_file_size_limit_holds_for_what_is_read_not_what_stat_said() -> None:
    """The 16 KiB limit was checked on stat() and then the path was read without bound: a key path naming a
    device (or a file swapped or grown after the check) was read whole. Check what is read, bound the read."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _READ_DEVICE, "/dev/zero"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("KeyFileError: "), proc.stderr[-500:]
    assert "/dev/zero" in proc.stdout


def test_pack_with_a_corrupt_golden_file_is_a_usage_error(
    party: Party, tiny_model: bytes, tmp_path: Path, capsys: Any
) -> None:
    """`pack --golden` on a file that starts like a zip but is not one: exit 2 with one line, no traceback
    (zipfile.BadZipFile is neither OSError nor ValueError)."""
    model, golden = tmp_path / "m.onnx", tmp_path / "g.npz"
    model.write_bytes(tiny_model)
    golden.write_bytes(b"PK\x03\x04 not really a zip")
    argv = [
        "pack",
        str(model),
        "--name",
        "m",
        "--version",
        "1",
        "--sign-key",
        str(party.dir / "publisher.key"),
    ]
    argv += [
        "--recipient",
        str(party.dir / "device.pub"),
        "--golden",
        str(golden),
        "-o",
        str(tmp_path / "o.egm"),
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "golden" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.egm").exists()


@pytest.mark.parametrize("where", ["golden_tolerance", "range"])
def test_huge_integer_where_a_float_is_expected_is_malformed(
    party: Party, tiny_bundle: bytes, forge: Forge, tmp_path: Path, where: str, *, capsys: Any
) -> None:
    """JSON integers have no size limit: float(10**400) raises OverflowError, which escaped the parser as a
    traceback, from `inspect` (unsigned bytes) as from `open_bundle` (signed)."""
    huge = 10**400

    def edit(p: Parts) -> Parts:
        m = dict(p.manifest)
        if where == "golden_tolerance":
            m["golden_tolerance"] = {"rtol": huge, "atol": 0.0}
        else:
            m["inputs"] = [dict(m["inputs"][0], range=[0, huge])]
        return Parts(m, p.wrapped, p.chunks)

    bad = forge(tiny_bundle, edit)
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bad, trust=party.trust, device_key=party.device, state_dir=None)
    assert exc.value.check == "malformed"
    path = tmp_path / "bad.egm"
    path.write_bytes(bad)
    rc = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert (
        rc == 3
        and err.startswith("edgeguard: bundle rejected: malformed: manifest:")
        and err.count("\n") == 1
    )


def test_pack_meta_with_a_huge_number_is_a_usage_error(
    party: Party, tiny_model: bytes, tmp_path: Path, capsys: Any
) -> None:
    """`pack --meta` with a tolerance of 1e400 written as an integer: exit 2, one line (was OverflowError)."""
    model, meta = tmp_path / "m.onnx", tmp_path / "meta.json"
    model.write_bytes(tiny_model)
    meta.write_text('{"tolerance": {"rtol": 1' + "0" * 400 + "}}")
    argv = ["pack", str(model), "--name", "m", "--version", "1", "--meta", str(meta)]
    argv += ["--sign-key", str(party.dir / "publisher.key"), "--recipient", str(party.dir / "device.pub")]
    rc = main([*argv, "-o", str(tmp_path / "o.egm")])
    err = capsys.readouterr().err
    assert rc == 2 and "tolerance" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("descr", "shape", "itemsize"),
    [("'|S0'", (10**12,), 0), ("[('a', '<f4')]", (1, 96), 4), ("'<U4'", (1, 96), 16)],
    ids=["empty-bytes", "struct", "str"],
)
def test_golden_arrays_must_have_a_tensor_dtype(
    party: Party, tiny_bundle: bytes, tiny_model: bytes, descr: str, shape: tuple[int, ...], *, itemsize: int
) -> None:
    """Golden vectors are tensors: a zero-width dtype (10^12 elements in no memory), a structured or a text
    array is refused as malformed instead of being handed to the self-test."""
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape!r}, }}"
    raw = header.encode() + b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\0" * (96 * itemsize)
    good = io.BytesIO()
    np.save(good, np.ones((1, 96), np.float32))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("0/in/x.npy", npy)
        z.writestr("0/out/y.npy", good.getvalue())
    m = split(tiny_bundle).manifest
    bad = seal(dict(m, golden_count=1), tiny_model, buf.getvalue(), key=party.publisher, to=party.recipient)
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bad, trust=party.trust, device_key=party.device, state_dir=None)
    assert exc.value.check == "malformed" and "dtype" in exc.value.detail


def test_pack_refuses_golden_vectors_the_device_would_refuse(party: Party, tiny_model: bytes) -> None:
    """The device's golden decoder judges at pack time too: a complex64 reference output is a ConfigError
    for the publisher, not a bundle that every device then rejects."""
    from edgeguard.errors import ConfigError

    golden = [{"in": {"x": np.ones((1, 96), np.float32)}, "out": {"y": np.ones((1, 96), np.complex64)}}]
    with pytest.raises(ConfigError, match="dtype"):
        pack_bundle(
            tiny_model,
            name="tiny",
            version=1,
            sign_key=party.publisher,
            recipients=[party.recipient],
            chunk_size=TINY_CHUNK,
            golden=golden,
        )
