"""The CLI contract, through real subprocesses: exit codes 0/2/3 and one stderr line naming the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeguard.bundle import _format as fmt


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def eg(*args: object, cwd: Path) -> Result:
    env = dict(os.environ, EDGEGUARD_DEBUG="0")
    p = subprocess.run(
        [sys.executable, "-m", "edgeguard", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def rejected(r: Result, check: str) -> None:
    assert r.code == 3, r
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert f"bundle rejected: {check}:" in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, yolov8n_path: Path, tiny_model: bytes) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.onnx").write_bytes(tiny_model)
    for kind, where in (("publisher", "pub"), ("device", "dev"), ("publisher", "pub2"), ("device", "dev2")):
        r = eg("keygen", kind, "--out", where, cwd=d)
        assert r.code == 0 and "key " in r.out, r
    golden: dict[str, np.ndarray] = {"0/in/images": np.zeros((1, 3, 320, 320), np.float32)}
    np.savez(d / "golden.npz", **golden)  # numpy < 2.1 would store allow_pickle= as an array
    r = eg(
        "pack",
        yolov8n_path,
        "--name",
        "yolo",
        "--version",
        2,
        "--sign-key",
        "pub/publisher.key",
        "--recipient",
        "dev/device.pub",
        "--golden",
        "golden.npz",
        "-o",
        "v2.egm",
        cwd=d,
    )
    assert r.code == 0 and "sealed yolo v2" in r.out, r
    r = eg(
        "pack",
        yolov8n_path,
        "--name",
        "yolo",
        "--version",
        1,
        "--sign-key",
        "pub/publisher.key",
        "--recipient",
        "dev/device.pub",
        "--expires",
        "2020-01-01T00:00:00Z",
        "--force",  # an expired bundle on purpose: pack refuses one without it
        "-o",
        "old.egm",
        cwd=d,
    )
    assert r.code == 0, r
    return d


def verify(d: Path, bundle: str, *extra: object) -> Result:
    return eg("verify", bundle, "--trust", "pub/publisher.pub", *extra, cwd=d)


def test_verify_ok_and_inspect(work: Path) -> None:
    r = verify(work, "v2.egm", "--device-key", "dev/device.key", "--state", "st", "--commit")
    assert r.code == 0 and "ok: yolo v2" in r.out and "decryption" in r.out, r
    r = eg("inspect", "v2.egm", cwd=work)
    info = json.loads(r.out)
    assert r.code == 0 and info["manifest"]["name"] == "yolo" and info["manifest"]["golden_count"] == 1
    assert info["signature_checked"] is False


def test_rejections_name_the_check(work: Path) -> None:
    data = (work / "v2.egm").read_bytes()
    (work / "flipped.egm").write_bytes(data[:-1000] + bytes([data[-1000] ^ 4]) + data[-999:])
    rejected(verify(work, "flipped.egm"), "integrity")
    (work / "sig.egm").write_bytes(data[:70] + bytes([data[70] ^ 1]) + data[71:])
    rejected(verify(work, "sig.egm"), "signature")
    rejected(verify(work, "v2.egm", "--device-key", "dev2/device.key"), "not a recipient")
    rejected(eg("verify", "v2.egm", "--trust", "pub2/publisher.pub", cwd=work), "untrusted signer")
    kid = json.loads(eg("inspect", "v2.egm", cwd=work).out)["signer_key_id"]
    rejected(verify(work, "v2.egm", "--revoked", kid), "revoked")
    (work / "revoked.txt").write_text(f"# stolen\n{kid}\n")
    rejected(verify(work, "v2.egm", "--revocation-list", "revoked.txt"), "revoked")
    rejected(verify(work, "old.egm"), "expired")
    (work / "junk.egm").write_bytes(b"PK\x03\x04 definitely not a bundle" * 10)
    rejected(verify(work, "junk.egm"), "malformed")
    magic, ver, flags, mlen, _, kid_raw, digest = fmt.HEADER.unpack(data[: fmt.HEADER_SIZE])
    huge = fmt.HEADER.pack(magic, ver, flags, mlen, 2**62, kid_raw, digest) + data[fmt.HEADER_SIZE :]
    (work / "huge.egm").write_bytes(huge)
    rejected(verify(work, "huge.egm"), "too large")


def test_pack_refuses_what_is_not_a_model(work: Path) -> None:
    r = eg(
        "pack",
        "v2.egm",
        "--name",
        "x",
        "--version",
        1,
        "--sign-key",
        "pub/publisher.key",
        "--recipient",
        "dev/device.pub",
        "-o",
        "notamodel.egm",
        cwd=work,
    )
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r
    assert not (work / "notamodel.egm").exists()


def test_rollback_rejected(work: Path) -> None:
    for v in (5, 4):
        r = eg(
            "pack",
            "tiny.onnx",
            "--name",
            "tiny",
            "--version",
            v,
            "--sign-key",
            "pub/publisher.key",
            "--recipient",
            "dev/device.pub",
            "-o",
            f"t{v}.egm",
            cwd=work,
        )
        assert r.code == 0, r
    assert verify(work, "t5.egm", "--device-key", "dev/device.key", "--state", "st3", "--commit").code == 0
    rejected(verify(work, "t4.egm", "--state", "st3"), "rollback")
    assert verify(work, "t5.egm", "--state", "st3").code == 0


def test_usage_errors_exit_2_with_one_line(work: Path) -> None:
    os.chmod(work / "dev" / "device.key", 0o644)
    try:
        r = verify(work, "v2.egm", "--device-key", "dev/device.key")
    finally:
        os.chmod(work / "dev" / "device.key", 0o600)
    assert r.code == 2 and "too open" in r.err and len(r.err.strip().splitlines()) == 1, r
    r = eg(
        "pack",
        "tiny.onnx",
        "--name",
        "bad name!",
        "--version",
        1,
        "--sign-key",
        "pub/publisher.key",
        "--recipient",
        "dev/device.pub",
        "-o",
        "x.egm",
        cwd=work,
    )
    assert r.code == 2 and "Traceback" not in r.err and "name" in r.err, r
    r = verify(work, "v2.egm", "--commit")
    assert r.code == 2 and "--commit needs" in r.err, r
    r = eg("pack", "--help", cwd=work)
    assert r.code == 0 and "example:" in r.out and "--recipient" in r.out


def test_another_model_name_is_refused_by_a_pinned_slot(work: Path) -> None:
    for name in ("slot-a", "slot-b"):
        r = eg(
            "pack", "tiny.onnx", "--name", name, "--version", 1, "--sign-key", "pub/publisher.key",
            "--recipient", "dev/device.pub", "-o", f"{name}.egm", cwd=work,
        )
        assert r.code == 0, r
    r = verify(work, "slot-a.egm", "--device-key", "dev/device.key", "--state", "st4", "--commit")
    assert r.code == 0, r
    rejected(verify(work, "slot-b.egm", "--state", "st4"), "wrong model")
