"""Every subcommand, every input it reads: a missing or unreadable input is exit 2 with the user's own path,
on one line, without a traceback (the exit-code contract in docs and `edgeguard --help`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeguard.cli import main
from tests.service._env import TINY_META, seal, tiny_onnx

# Paths under the work directory (the tests chdir there): what the user typed, as they typed it.
PUB, KEY, DPUB, DKEY = "keys/publisher.pub", "keys/publisher.key", "keys/device.pub", "keys/device.key"
TRUST = ["--trust", PUB]
SEAL = ["--name", "m", "--version", "1", "--sign-key", KEY, "--recipient", DPUB]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-inputs")
    golden = {"x": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)}
    (d / "m.egm").write_bytes(seal(d, tiny_onnx(), name="m", version=1, meta=TINY_META, golden_in=golden))
    (d / "m.onnx").write_bytes(tiny_onnx())
    np.save(d / "x.npy", golden["x"])
    (d / "adir").mkdir()
    (d / "afile").write_text("")
    return d


@pytest.fixture
def cwd(workdir: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(workdir)
    try:
        yield workdir
    finally:
        os.chdir(old)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


MISSING_INPUTS: list[tuple[str, list[str], str]] = [
    ("verify bundle", ["verify", "missing.egm", *TRUST], "missing.egm"),
    ("verify bundle+key", ["verify", "missing.egm", *TRUST, "--device-key", DKEY], "missing.egm"),
    ("verify bundle is a dir", ["verify", "adir", *TRUST], "adir"),
    ("verify --trust", ["verify", "m.egm", "--trust", "nope.pub"], "nope.pub"),
    ("verify --device-key", ["verify", "m.egm", *TRUST, "--device-key", "nope.key"], "nope.key"),
    ("verify --revocation-list", ["verify", "m.egm", *TRUST, "--revocation-list", "nope.txt"], "nope.txt"),
    ("inspect", ["inspect", "missing.egm"], "missing.egm"),
    ("pack model", ["pack", "missing.onnx", *SEAL, "-o", "o.egm"], "missing.onnx"),
    ("pack --sign-key", ["pack", "m.onnx", *SEAL[:5], "nope.key", "--recipient", DPUB, "-o", "o.egm"],
     "nope.key"),
    ("pack --recipient", ["pack", "m.onnx", *SEAL[:7], "nope.pub", "-o", "o.egm"], "nope.pub"),
    ("pack --golden", ["pack", "m.onnx", *SEAL, "--golden", "nope.npz", "-o", "o.egm"], "nope.npz"),
    ("pack --meta", ["pack", "m.onnx", *SEAL, "--meta", "nope.json", "-o", "o.egm"], "nope.json"),
    ("pack -o in a missing dir", ["pack", "m.onnx", *SEAL, "-o", "nodir/sub/o.egm"], "nodir/sub/o.egm"),
    ("infer --bundle", ["infer", "--bundle", "missing.egm", *TRUST, "--device-key", DKEY, "x.npy"],
     "missing.egm"),
    ("infer --device-key", ["infer", "--bundle", "m.egm", *TRUST, "--device-key", "nope.key", "x.npy"],
     "nope.key"),
    ("infer input", ["infer", "--bundle", "m.egm", *TRUST, "--device-key", DKEY, "nope.npy"], "nope.npy"),
    ("doctor --bundle", ["doctor", "--bundle", "missing.egm", *TRUST, "--device-key", DKEY], "missing.egm"),
    ("doctor --profile", ["doctor", "--profile", "nope.toml"], "nope.toml"),
    ("run -c", ["run", "-c", "nope.toml"], "nope.toml"),
    ("run --check -c", ["run", "--check", "-c", "nope.toml"], "nope.toml"),
    ("keygen --out under a file", ["keygen", "device", "--out", "afile/keys"], "afile/keys"),
    ("quantize model", ["quantize", "missing.onnx", "--calibration", "adir", "-o", "q.onnx"], "missing.onnx"),
    ("quantize --calibration", ["quantize", "m.onnx", "--calibration", "nope.npz", "-o", "q.onnx"],
     "nope.npz"),
]


@pytest.mark.parametrize(
    ("argv", "path"), [c[1:] for c in MISSING_INPUTS], ids=[c[0] for c in MISSING_INPUTS]
)
def test_a_missing_input_is_exit_2_naming_the_users_path(
    cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str], path: str
) -> None:
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert path in lines[0], err
    assert ".tmp" not in err, err  # never a temporary file's name


def test_a_public_key_as_device_key_says_so_before_any_mode_advice(
    cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (cwd / DPUB).stat().st_mode & 0o044  # readable by others, as a public key is
    (cwd / "o.egm").unlink(missing_ok=True)
    code, err = run(["verify", "m.egm", *TRUST, "--device-key", DPUB], capsys)
    assert code == 2
    assert err.strip() == f"edgeguard: {DPUB} is a public key; pass the device's private key (device.key)"
    code, err = run(["pack", "m.onnx", *SEAL[:5], PUB, "--recipient", DPUB, "-o", "o.egm"], capsys)
    assert code == 2 and "is a public key; pass the publisher's private key (publisher.key)" in err, err
    code, err = run(["verify", "m.egm", "--trust", KEY], capsys)
    assert code == 2 and "is a private key; pass the publisher's public key (publisher.pub)" in err, err
    assert not (cwd / "o.egm").exists()


def _pack(cwd: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    (cwd / "o.egm").unlink(missing_ok=True)
    return run(["pack", "m.onnx", *SEAL, *extra, "-o", "o.egm"], capsys)


def test_pack_expires_a_date_is_midnight_utc_and_the_hint_is_valid(
    cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _pack(cwd, capsys, "--expires", "2099-06-30") == (0, "")
    assert _pack(cwd, capsys, "--expires", "2099-06-30Z") == (0, "")  # what the old hint suggested
    code, _ = run(["verify", "o.egm", *TRUST, "--json"], capsys)
    assert code == 0
    code, err = run(["inspect", "o.egm"], capsys)
    assert code == 0
    # A time without a timezone is refused with a hint that is itself accepted.
    code, err = _pack(cwd, capsys, "--expires", "2099-06-30T12:00")
    assert code == 2 and "needs a timezone" in err, err
    hints = [w.rstrip(",") for w in err.split() if w.startswith("2099-06-30T12:00")]
    assert hints == ["2099-06-30T12:00Z", "2099-06-30T12:00+02:00"], err
    for hint in hints:
        assert _pack(cwd, capsys, "--expires", hint) == (0, ""), hint


def test_pack_expires_midnight_utc_in_the_manifest(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert _pack(cwd, capsys, "--expires", "2099-06-30")[0] == 0
    capsys.readouterr()
    assert main(["inspect", "o.egm"]) == 0
    doc = json.loads(capsys.readouterr().out)
    not_after = datetime.fromisoformat(doc["manifest"]["not_after"].replace("Z", "+00:00"))
    assert not_after == datetime(2099, 6, 30, tzinfo=timezone.utc)


def test_pack_refuses_an_already_expired_bundle_unless_forced(
    cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    code, err = _pack(cwd, capsys, "--expires", past)
    assert code == 2 and "is in the past" in err and "--force" in err, err
    assert not (cwd / "o.egm").exists()
    code, _ = _pack(cwd, capsys, "--expires", past, "--force")
    assert code == 0
    code, err = run(["verify", "o.egm", *TRUST], capsys)
    assert code == 3 and "expired" in err, err
