"""Device profiles: the shipped files validate, typos are refused with file+key, detection on fake trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeguard.errors import ConfigError
from edgeguard.profiles import (
    ONNX_KINDS,
    TFLITE_KINDS,
    detect_profile,
    get_profile,
    load_profile_file,
    load_profiles,
    profile_dirs,
)

SHIPPED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin", "coral-usb", "coral-devboard",
           "generic-aarch64", "generic-x86_64"}

GOOD = """\
[profile]
name = "board"
threads = 2

[detect]
arch = ["x86_64"]

[[accelerators.onnx]]
kind = "cpu"

[[accelerators.tflite]]
kind = "external"
label = "npu"
options = { library = "/usr/lib/libnpu.so", delegate_options = { cache = "/tmp/x" } }
"""


def test_every_shipped_profile_validates() -> None:
    profiles = load_profiles()
    assert set(profiles) >= SHIPPED
    for prof in profiles.values():
        assert prof.onnx and prof.tflite, prof.name
        assert all(a.kind in ONNX_KINDS for a in prof.onnx)
        assert all(a.kind in TFLITE_KINDS for a in prof.tflite)
        # The plain CPU kernels are always the last resort: a profile never leaves a model without a path.
        assert prof.onnx[-1].kind == "cpu" and prof.tflite[-1].kind == "builtin", prof.name


def test_good_profile_parses_into_frozen_values(tmp_path: Path) -> None:
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    prof = load_profile_file(path)
    assert prof.name == "board" and prof.threads == 2 and prof.source == str(path)
    npu = prof.tflite[0]
    assert npu.label == "npu" and npu.options["library"] == "/usr/lib/libnpu.so"
    assert npu.options["delegate_options"]["cache"] == "/tmp/x"
    with pytest.raises(TypeError):
        npu.options["library"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        prof.threads = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("threads = 2", "threads = 2\nthreds = 4", "unknown key 'profile.threds'"),
        ("threads = 2", 'threads = "2"', "key 'profile.threads' must be an integer, got str"),
        ("threads = 2", "threads = true", "key 'profile.threads' must be an integer, got bool"),
        ("threads = 2", "threads = 300", "threads must be 0..256"),
        ('kind = "cpu"', 'kind = "cpuu"', "'accelerators.onnx[0].kind' = 'cpuu' is not a onnx accelerator"),
        ('kind = "cpu"', 'kind = "cpu"\noptions = { arenna = false }', "unknown key 'accelerators.onnx[0]"
         ".options.arenna'"),
        ('kind = "cpu"', 'kind = "cpu"\noptions = { graph_optimization = "max" }',
         "graph_optimization' must"),
        ('kind = "cpu"', 'kind = "tensorrt"\noptions = { fp16 = "yes" }',
         "'accelerators.onnx[0].options.fp16' must be true/false"),
        ('kind = "cpu"', 'kind = "cpu"\nthreads = 0', "accelerator threads must be 1..256"),
        ('label = "npu"\noptions = { library = "/usr/lib/libnpu.so", '
         'delegate_options = { cache = "/tmp/x" } }', 'label = "npu"',
         "'accelerators.tflite[0].options.library' is required"),
        ('arch = ["x86_64"]', 'arch = "x86_64"', "key 'detect.arch' must be a list"),
        ('arch = ["x86_64"]', "arch = [1]", "key 'detect.arch' must be a list of strings"),
        ("[detect]", "[detection]", "unknown table 'detection'"),
        ("[[accelerators.tflite]]", "[[accelerators.tfite]]", "unknown key 'accelerators.tfite'"),
        ('name = "board"', 'name = "other"', "must match the file name 'board'"),
        ('name = "board"', "", "'profile.name' is required"),
        ('[[accelerators.tflite]]\nkind = "external"', '[[accelerators.onnx]]\nkind = "cpu"\n'
         '[[accelerators.tflite]]\nkind = "external"', "labels must be unique"),
        ("threads = 2", "threads = 2\n[engine]\nstandby = 9", "standby must be 0..8"),
        ("threads = 2", "threads = 2\n[watchdog]\ndevice = 5", "key 'watchdog.device' must be a string"),
        ("threads = 2", "threads = [2", "not valid TOML"),
    ],
)
def test_bad_profile_is_refused_naming_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    path = tmp_path / "board.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_profiles([tmp_path])
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown device profile 'raspberry-pi-3'.*raspberry-pi-4"):
        get_profile("raspberry-pi-3")


def test_profiles_dir_from_environment_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "generic-x86_64.toml").write_text(GOOD.replace('"board"', '"generic-x86_64"'))
    monkeypatch.setenv("EDGEGUARD_PROFILES_DIR", str(tmp_path))
    assert profile_dirs()[0] == tmp_path
    assert get_profile("generic-x86_64").source == str(tmp_path / "generic-x86_64.toml")
    assert get_profile("raspberry-pi-4").name == "raspberry-pi-4"  # the packaged ones are still found


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize(
    ("arch", "files", "expected"),
    [
        ("aarch64", {"proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00"}, "raspberry-pi-4"),
        ("aarch64", {"proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00"}, "raspberry-pi-5"),
        ("aarch64", {"proc/device-tree/model": "NVIDIA Jetson Nano Developer Kit\x00",
                     "etc/nv_tegra_release": "# R32 (release), REVISION: 7.1"}, "jetson-nano"),
        ("aarch64", {"proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
                     "etc/nv_tegra_release": "# R36 (release), REVISION: 3.0"}, "jetson-orin"),
        ("aarch64", {"proc/device-tree/model": "Freescale i.MX8MQ Phanbell\x00"}, "coral-devboard"),
        ("aarch64", {"proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00",
                     "sys/bus/usb/devices/2-1/idVendor": "18d1\n",
                     "sys/bus/usb/devices/2-1/idProduct": "9302\n"}, "coral-usb"),
        ("x86_64", {"sys/bus/usb/devices/1-2/idVendor": "1a6e", "sys/bus/usb/devices/1-2/idProduct": "089a"},
         "coral-usb"),
        ("aarch64", {"proc/device-tree/model": "Pine64 RockPro64\x00"}, "generic-aarch64"),
        ("x86_64", {"proc/cpuinfo": "processor\t: 0\nflags\t\t: fpu sse2 avx2\n"}, "generic-x86_64"),
    ],
)
def test_detection_on_fake_trees(tmp_path: Path, arch: str, files: dict[str, str], expected: str) -> None:
    assert detect_profile(_tree(tmp_path, files), arch=arch).name == expected


def test_no_profile_matches_an_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no device profile matches this board.*riscv64.*--profile"):
        detect_profile(tmp_path, arch="riscv64")


def test_cpu_flags_rule_requires_all_flags(tmp_path: Path) -> None:
    prof = GOOD.replace('arch = ["x86_64"]', 'cpu_flags = ["avx2", "avx512vnni"]')
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "board.toml").write_text(prof)
    root = _tree(tmp_path / "root", {"proc/cpuinfo": "flags : fpu avx2\n"})
    with pytest.raises(ConfigError, match="no device profile matches"):
        detect_profile(root, arch="x86_64", dirs=[tmp_path / "p"])
    (root / "proc/cpuinfo").write_text("flags : fpu avx2 avx512vnni\n")
    assert detect_profile(root, arch="x86_64", dirs=[tmp_path / "p"]).name == "board"
