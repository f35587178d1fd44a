"""Finding, reading and detecting device profiles.

Profiles are searched in ``$EDGEGUARD_PROFILES_DIR`` (when set), then in the copy packaged inside the wheel
(``edgeguard/profiles_data``), then in ``device_profiles/`` of a source checkout. Detection reads the board's
identity files below a ``root`` path so tests can hand it a fake ``/proc`` tree.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError

from ._schema import Profile, profile_from_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "profile_dirs",
    "load_profile_file",
    "load_profiles",
    "get_profile",
    "BoardFacts",
    "read_board_facts",
    "match_profile",
    "detect_profile",
]

_MAX_PROFILE_BYTES = 64 * 1024
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def profile_dirs() -> list[Path]:
    """Directories searched for ``*.toml`` profiles, first wins when two define the same name."""
    dirs: list[Path] = []
    env = os.environ.get("EDGEGUARD_PROFILES_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(_PACKAGE_ROOT / "profiles_data")
    dirs.append(_PACKAGE_ROOT.parent / "device_profiles")
    return dirs


def load_profile_file(path: Path) -> Profile:
    """Read and validate one profile file; any problem is a ``ConfigError`` naming the file."""
    data = read_checked(path, what="profile", limit=_MAX_PROFILE_BYTES, error=ConfigError).data
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return profile_from_table(raw, source=str(path))


def load_profiles(dirs: list[Path] | None = None) -> dict[str, Profile]:
    """All profiles by name. A broken file is an error (not skipped): it could be the board's own profile."""
    found: dict[str, Profile] = {}
    for d in profile_dirs() if dirs is None else dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.toml")):
            prof = load_profile_file(path)
            if path.stem != prof.name:
                raise ConfigError(f"{path}: profile.name {prof.name!r} must match the file name "
                                  f"{path.stem!r}")
            found.setdefault(prof.name, prof)
    if not found:
        searched = ", ".join(str(d) for d in (dirs or profile_dirs()))
        raise ConfigError(f"no device profiles found in {searched}")
    return found


def get_profile(name_or_path: str, dirs: list[Path] | None = None) -> Profile:
    """A profile by name, or by path when the argument names a ``.toml`` file."""
    if name_or_path.endswith(".toml"):
        return load_profile_file(Path(name_or_path))
    profiles = load_profiles(dirs)
    try:
        return profiles[name_or_path]
    except KeyError:
        raise ConfigError(f"unknown device profile {name_or_path!r} (known: {', '.join(sorted(profiles))})") \
            from None


@dataclass(frozen=True, kw_only=True)
class BoardFacts:
    """What the board says about itself (all strings normalised, empty when absent)."""

    arch: str
    device_tree_model: str
    nv_tegra_release: str
    cpu_flags: frozenset[str]
    usb_ids: frozenset[str]
    root: Path

    def to_json(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "device_tree_model": self.device_tree_model,
            "nv_tegra_release": self.nv_tegra_release.splitlines()[0] if self.nv_tegra_release else "",
            "cpu_flags": len(self.cpu_flags),
            "usb_ids": sorted(self.usb_ids),
        }


def _read_text(path: Path, limit: int = 1 << 20) -> str:
    try:
        with path.open("rb") as f:
            return f.read(limit).decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return ""


def read_board_facts(root: Path = Path("/"), *, arch: str | None = None) -> BoardFacts:
    """Collect the identity of the board below ``root`` (``/`` on a device, a fake tree in tests)."""
    flags: set[str] = set()
    for line in _read_text(root / "proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    usb: set[str] = set()
    usb_root = root / "sys/bus/usb/devices"
    if usb_root.is_dir():
        for dev in usb_root.iterdir():
            vendor, product = _read_text(dev / "idVendor"), _read_text(dev / "idProduct")
            if vendor and product:
                usb.add(f"{vendor.lower()}:{product.lower()}")
    return BoardFacts(
        arch=arch if arch is not None else platform.machine(),
        device_tree_model=_read_text(root / "proc/device-tree/model"),
        nv_tegra_release=_read_text(root / "etc/nv_tegra_release"),
        cpu_flags=frozenset(flags),
        usb_ids=frozenset(usb),
        root=root,
    )


def _matches(profile: Profile, facts: BoardFacts) -> bool:
    d = profile.detect
    if d.arch and facts.arch not in d.arch:
        return False
    if d.device_tree_model and not any(s in facts.device_tree_model for s in d.device_tree_model):
        return False
    if d.nv_tegra_release and not any(s in facts.nv_tegra_release for s in d.nv_tegra_release):
        return False
    if d.cpu_flags and not set(d.cpu_flags) <= facts.cpu_flags:
        return False
    if d.usb_ids and not any(u.lower() in facts.usb_ids for u in d.usb_ids):
        return False
    return not (d.paths and not any((facts.root / p.lstrip("/")).exists() for p in d.paths))


def match_profile(profiles: dict[str, Profile], facts: BoardFacts) -> Profile:
    """The matching profile with the highest priority (ties broken by name, so the choice is stable)."""
    matching = [p for p in profiles.values() if _matches(p, facts)]
    if not matching:
        raise ConfigError(f"no device profile matches this board (arch {facts.arch!r}, model "
                          f"{facts.device_tree_model!r}); pass --profile NAME")
    return sorted(matching, key=lambda p: (-p.priority, p.name))[0]


def detect_profile(root: Path = Path("/"), *, arch: str | None = None,
                   dirs: list[Path] | None = None) -> Profile:
    """Detect the board below ``root`` and return its profile."""
    return match_profile(load_profiles(dirs), read_board_facts(root, arch=arch))
