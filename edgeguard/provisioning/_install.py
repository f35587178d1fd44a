"""``edgeguard provision ARCHIVE``: install a verified provisioning archive on the board.

Layout (``root`` is ``/`` on a board, a directory in tests):

* ``<root>/etc/edgeguard/``: ``edgeguard.toml`` and the fleet's public files (``fleet-ca.pem``,
  ``publisher.pub``, ``operator.pub``), the device's certificate and keys. ``device.key`` and ``api-tokens``
  are exactly the files ``firmware_hooks/edgeguard.service`` hands to the service as systemd credentials
  (``LoadCredential=device-key:/etc/edgeguard/device.key``, ``api-tokens:/etc/edgeguard/api-tokens``); the
  config names them by credential, so they stay root-only and the service reads its private copy in
  ``$CREDENTIALS_DIRECTORY``.
* ``<root>/var/lib/edgeguard/`` (mode 0700): the state dir (systemd ``StateDirectory=edgeguard``).

Each file is written atomically and only when its content changes, the config last (a config never names a
file that is not there yet), so re-running with the same archive changes nothing and a power cut leaves the
old or the new file. Installing as root onto ``/`` hands the files the service opens by path (the config, the
TLS and signing keys) and the state dir to the ``edgeguard`` user when it exists.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ArchiveRejected, ConfigError, KeyFileError
from edgeguard.keys import DeviceKey, load_device_key, load_trusted_key, public_key_id

from ._archive import OpenedArchive, open_archive, read_archive_file
from ._enroll import FLEET_KEY_ID_FILE

__all__ = ["InstallReport", "install_archive", "REQUIRED_FILES", "SERVICE_USER"]

SERVICE_USER = "edgeguard"
REQUIRED_FILES = (
    "fleet-ca.pem",
    "publisher.pub",
    "device.pub",
    "device-sign.pub",
    "client.pem",
    "device.key",
    "device-sign.key",
    "client.key",
    "api-tokens",
    "edgeguard.toml",
)
_ENROLLED_KEYS = ("device.key", "device-sign.key", "client.key")
_ROOT_ONLY = frozenset({"device.key", "api-tokens"})  # read by systemd (as root) for the credentials


@dataclass(frozen=True)
class InstallReport:
    device: str
    fleet: str
    etc: Path
    state: Path
    written: tuple[str, ...]
    unchanged: tuple[str, ...]
    sealed: bool


def _pinned_key_id(etc: Path, keys_dir: Path | None, explicit: str | None) -> str:
    if explicit is not None:
        kid = explicit.strip().lower()
        if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
            raise ConfigError(
                f"--fleet-key-id {explicit!r}: 16 hex digits (printed by `edgeguard fleet init`)"
            )
        return kid
    if keys_dir is not None and (keys_dir / FLEET_KEY_ID_FILE).is_file():
        text = read_checked(keys_dir / FLEET_KEY_ID_FILE, what="fleet key id", limit=64, error=ConfigError)
        return _pinned_key_id(etc, None, text.data.decode("ascii", "replace"))
    if (etc / "publisher.pub").is_file():
        return public_key_id(load_trusted_key(etc / "publisher.pub"))  # re-provisioning: the fleet it has
    raise ConfigError(
        "no fleet key to check the archive against: pass --fleet-key-id (printed by `edgeguard fleet init`)"
    )


def _expected_device(keys_dir: Path | None) -> str | None:
    if keys_dir is None or not (keys_dir / "device.csr").is_file():
        return None
    data = read_checked(keys_dir / "device.csr", what="CSR", limit=16 * 1024, error=ConfigError).data
    try:
        names = x509.load_pem_x509_csr(data).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        raise ConfigError(f"{keys_dir / 'device.csr'} is not a readable CSR (re-run enroll)") from None
    return str(names[0].value) if names else None


def _merge_enrolled_keys(opened: OpenedArchive, keys_dir: Path | None) -> dict[str, tuple[int, bytes]]:
    files = dict(opened.files)
    missing = [k for k in _ENROLLED_KEYS if k not in files]
    if missing:
        if keys_dir is None:
            raise ConfigError(
                f"the archive holds no {missing[0]} (enrolled device): pass --keys DIR from enroll"
            )
        for name in missing:
            files[name] = (
                0o600,
                read_checked(
                    keys_dir / name, what="key file", limit=16 * 1024, error=KeyFileError, private=True
                ).data,
            )
    absent = [n for n in REQUIRED_FILES if n not in files]
    if absent:
        raise ArchiveRejected("malformed", f"archive lacks {', '.join(absent)}")
    return files


def _check_key_pairs(files: dict[str, tuple[int, bytes]], where: Path) -> None:
    """Every private key matches the public half the fleet signed: a wrong --keys DIR fails here, not later
    at the broker or on the first bundle."""
    device = serialization.load_pem_private_key(files["device.key"][1], password=None)
    sign = serialization.load_pem_private_key(files["device-sign.key"][1], password=None)
    tls = serialization.load_pem_private_key(files["client.key"][1], password=None)
    cert = x509.load_pem_x509_certificate(files["client.pem"][1])
    device_pub = serialization.load_pem_public_key(files["device.pub"][1])
    sign_pub = serialization.load_pem_public_key(files["device-sign.pub"][1])
    if not isinstance(device, X25519PrivateKey) or device.public_key() != device_pub:
        raise KeyFileError(f"{where / 'device.key'} does not match the device key in the archive")
    if not isinstance(sign, Ed25519PrivateKey) or sign.public_key() != sign_pub:
        raise KeyFileError(f"{where / 'device-sign.key'} does not match the signing key in the archive")
    if not isinstance(tls, ec.EllipticCurvePrivateKey) or tls.public_key() != cert.public_key():
        raise KeyFileError(f"{where / 'client.key'} does not match the certificate in the archive")
    if "site.pem" in files:  # the site connection's certificate (docs/sites.md): same key, CN site:<device>
        site = x509.load_pem_x509_certificate(files["site.pem"][1])
        names = site.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        owner = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if site.public_key() != cert.public_key() or not names or not owner or names[0].value != (
            f"site:{owner[0].value!s}"
        ):
            raise ArchiveRejected("malformed", "site.pem is not the site certificate of this device's key")


def _installed_device(etc: Path) -> str | None:
    """The device this board is provisioned as (its certificate's CN), or None on a fresh board."""
    cert = _current(etc / "client.pem")
    if cert is None:
        return None
    try:
        names = x509.load_pem_x509_certificate(cert).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(names[0].value) if names else None


def _service_owner(root: Path) -> tuple[int, int] | None:
    if root.resolve() != Path("/") or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _current(path: Path) -> bytes | None:
    try:
        return read_checked(path, what="installed file", limit=1 << 20, error=OSError).data
    except OSError:
        return None


def install_archive(
    archive: Path,
    *,
    root: Path = Path("/"),
    fleet_key_id: str | None = None,
    keys_dir: Path | None = None,
    replace: bool = False,
) -> InstallReport:
    """Verify and install ``archive`` below ``root``. ``replace``: allow re-provisioning a board that is
    provisioned as another device (its identity, keys and tokens change; the state dir is kept)."""
    etc, state = root / "etc/edgeguard", root / "var/lib/edgeguard"
    data = read_archive_file(archive)
    pinned = _pinned_key_id(etc, keys_dir, fleet_key_id)
    device_key: DeviceKey | None = None
    if keys_dir is not None and (keys_dir / "device.key").exists():
        device_key = load_device_key(keys_dir / "device.key")
    elif (etc / "device.key").exists():
        device_key = load_device_key(etc / "device.key")  # re-provisioning an enrolled device in place
    opened = open_archive(data, fleet_key_id=pinned, device=_expected_device(keys_dir), device_key=device_key)
    current = _installed_device(etc)
    if current is not None and current != opened.device and not replace:
        raise ConfigError(
            f"this board is provisioned as {current}; the archive is for {opened.device} "
            "(--replace re-provisions it under the new identity)"
        )
    files = _merge_enrolled_keys(opened, keys_dir if keys_dir is not None else etc)
    try:
        _check_key_pairs(files, keys_dir or etc)
    except (ValueError, TypeError) as exc:
        raise ArchiveRejected(
            "malformed", f"a key or certificate in the archive does not parse ({exc})"
        ) from None

    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = _service_owner(root)
    written, unchanged = [], []
    # The config last: until it is replaced, the old config names only files that are there.
    for name in sorted(files, key=lambda n: n == "edgeguard.toml"):
        mode, content = files[name]
        target = etc / name
        if _current(target) == content:
            unchanged.append(name)
        else:
            atomic_write(target, content, mode=mode)
            written.append(name)
        if owner is not None and name not in _ROOT_ONLY:
            os.chown(target, *owner, follow_symlinks=False)
    if owner is not None:
        os.chown(state, *owner, follow_symlinks=False)
    return InstallReport(
        device=opened.device,
        fleet=opened.fleet,
        etc=etc,
        state=state,
        written=tuple(written),
        unchanged=tuple(unchanged),
        sealed=opened.sealed,
    )
