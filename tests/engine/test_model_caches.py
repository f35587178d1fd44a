"""No shipped profile puts a plaintext-equivalent of the model on disk, and a model cache a user enables is
refused unless it lives on a RAM filesystem; ``doctor`` says where each cache lives."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest

from edgeguard.cli import main
from edgeguard.engine._cache_dirs import (
    PLAINTEXT_CACHE_OPTIONS,
    check_cache_dirs,
    filesystem_of,
    profile_cache_dirs,
)
from edgeguard.engine._onnx import provider_options
from edgeguard.errors import BackendError
from edgeguard.profiles import Accelerator
from edgeguard.profiles._load import load_profile_file

ROOT = Path(__file__).resolve().parents[2]
# Both places profiles ship from (one may be a link to the other: resolved, each file once).
SHIPPED = sorted(
    {p.resolve() for d in ("edgeguard/profiles_data", "device_profiles") for p in (ROOT / d).glob("*.toml")}
)
# A device whose root is on a disk and /run on tmpfs, as /proc/self/mounts writes it.
MOUNTS = "/dev/mmcblk0p2 / ext4 rw 0 0\ntmpfs /run tmpfs rw 0 0\n"


def _accel(kind: str, **options: object) -> Accelerator:
    return Accelerator(kind=kind, label=kind, options=MappingProxyType(dict(options)))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_profiles_put_no_plaintext_equivalent_file_on_disk(path: Path) -> None:
    profile = load_profile_file(path)
    # Off by default: no candidate configures a cache that holds the model, wherever it would be.
    assert profile_cache_dirs(profile, mounts=MOUNTS) == []
    for a in profile.candidates("onnx"):
        opts = provider_options(a, 4)
        cache_keys = {"trt_engine_cache_enable", "trt_engine_cache_path", "cache_dir"}
        assert not cache_keys & set(opts), (a.label, opts)
        assert not any(k.startswith("ep.context") or "dump" in k for k in opts), (a.label, opts)
    assert len(SHIPPED) >= 8


def test_a_model_cache_on_disk_is_refused_in_ram_accepted(tmp_path: Path) -> None:
    for kind, option in ((k, o) for k, opts in PLAINTEXT_CACHE_OPTIONS.items() for o in opts):
        with pytest.raises(BackendError) as exc:
            check_cache_dirs(_accel(kind, **{option: "/var/cache/edgeguard/trt"}), mounts=MOUNTS)
        msg = str(exc.value)
        assert f"{option} /var/cache/edgeguard/trt is on ext4, not a RAM filesystem" in msg
        assert "\n" not in msg
        check_cache_dirs(_accel(kind, **{option: "/run/edgeguard/trt"}), mounts=MOUNTS)  # not yet created
    usb = tmp_path / "usb disk"  # mount points with spaces are octal-escaped in /proc/self/mounts
    usb.mkdir()
    mounts = MOUNTS + f"/dev/sda1 {str(usb).replace(' ', chr(92) + '040')} vfat rw 0 0\n"
    gpu = _accel("gpu", delegate_options={"serialization_dir": str(usb / "cl")})
    with pytest.raises(BackendError, match=r"delegate_options\.serialization_dir .*/usb disk/cl is on vfat"):
        check_cache_dirs(gpu, mounts=mounts)
    assert filesystem_of(Path("/run/x/../edgeguard"), mounts=MOUNTS) == "tmpfs"
    assert filesystem_of(Path("/runx"), mounts=MOUNTS) == "ext4"  # a prefix is not a mount point


def test_provider_options_refuse_a_disk_engine_cache_on_this_machine(tmp_path: Path) -> None:
    # /proc/self is procfs and /dev/shm is tmpfs on any Linux: the real /proc/self/mounts decides.
    with pytest.raises(BackendError, match="not a RAM filesystem"):
        provider_options(_accel("tensorrt", fp16=True, engine_cache_path="/proc/self/trt"), 1)
    opts = provider_options(_accel("tensorrt", engine_cache_path="/dev/shm/edgeguard-trt"), 1)
    assert opts["trt_engine_cache_path"] == "/dev/shm/edgeguard-trt"


def test_doctor_says_where_the_cache_lives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "device_profiles/generic-x86_64.toml").read_text()
    trt = 'options = { fp16 = true, engine_cache_path = "/dev/shm/eg-trt" }'
    text = text.replace("options = { fp16 = true }", trt)
    text = text.replace('precision = "FP32" }', 'precision = "FP32", cache_dir = "/proc/self/ov" }')
    prof = tmp_path / "cached.toml"
    prof.write_text(text)
    assert main(["doctor", "--profile", str(prof), "--json"]) == 0
    caches = {c["option"]: c for c in json.loads(capsys.readouterr().out)["model_caches"]}
    assert caches["engine_cache_path"]["path"] == "/dev/shm/eg-trt" and caches["engine_cache_path"]["in_ram"]
    assert caches["cache_dir"]["filesystem"] == "proc" and caches["cache_dir"]["in_ram"] is False
    assert main(["doctor", "--profile", str(prof)]) == 0
    out = capsys.readouterr().out
    assert "/dev/shm/eg-trt (tmpfs; in RAM)" in out and "/proc/self/ov (proc; REFUSED" in out
    assert main(["doctor", "--profile", "generic-x86_64"]) == 0
    assert "model caches: none" in capsys.readouterr().out
