"""Issuing identities: devices (``add-device``, ``sign-device``) and operators, their archives, and revoking
them. Every function here changes the fleet directory; callers hold ``FleetDir.locked()`` and save
the inventory once at the end of their batch.

Idempotent by construction: whatever already exists in a device's directory (keys, certificate, tokens) is
reused, so running ``add-device`` again gives the same keys and certificate; ``rotate=True`` revokes the old
certificate (it goes on the CRL) and issues everything anew.

A device in a group also gets ``site.pem``: a second certificate for the same TLS key with CN
``site:<device>``, for its site connection (docs/sites.md). The fleet's broker makes the CN the client id, so
the link and the site connection need one each; the ACL grants the group topics to the site identity only.
Leaving every group revokes it.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edgeguard._atomic import atomic_write
from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError, KeyFileError
from edgeguard.keys import (
    PublisherKey,
    generate_keypair,
    load_publisher_key,
    load_recipient_key,
    public_key_id,
)
from edgeguard.provisioning import (
    DEVICE_KEY_URN,
    SIGN_KEY_URN,
    build_archive,
)

from . import _pki as pki
from ._fleetdir import ID_RE, FleetDir
from ._inventory import DeviceRecord, Inventory, OperatorRecord
from ._keyfiles import ensure_ec_key, ensure_ed25519, read_cert
from ._template import render_device_config

__all__ = ["Issuer", "MAX_CSR_BYTES"]

MAX_CSR_BYTES = 16 * 1024
_PEM_PUB = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _check_device_id(device_id: str) -> None:
    if not ID_RE.fullmatch(device_id):
        raise ConfigError(f"device id {device_id[:80]!r}: 1..64 of A-Z a-z 0-9 _ . -")


class Issuer:
    """The fleet's signing material, loaded once per command (a batch of devices reads the CA once)."""

    def __init__(self, fd: FleetDir, inventory: Inventory) -> None:
        self.fd, self.inv, self.cfg = fd, inventory, fd.config
        self.ca_key = ensure_ec_key(fd.ca_key) if fd.ca_key.exists() else None
        ca_cert = read_cert(fd.ca_cert)
        if self.ca_key is None or ca_cert is None:
            raise ConfigError(
                f"{fd.root}: fleet CA missing (ca/ca.key, ca/ca.pem); run `edgeguard fleet init`"
            )
        self.ca_cert = ca_cert
        self._publisher: PublisherKey | None = None
        self.crl_stale = False  # a certificate was revoked on the way (a site certificate): write_crl()

    @property
    def publisher(self) -> PublisherKey:
        if self._publisher is None:
            self._publisher = load_publisher_key(self.fd.publisher_key)
        return self._publisher

    # ------------------------------------------------------------------------------------------ devices
    def add_device(
        self, device_id: str, groups: tuple[str, ...] | None, *, rotate: bool = False
    ) -> DeviceRecord:
        """Keys, certificate, tokens and config for a device whose keys the fleet makes."""
        _check_device_id(device_id)
        old = self.inv.devices.get(device_id)
        if old is not None and old.enrolled == "device" and not rotate:
            raise ConfigError(
                f"device {device_id} enrolled its own keys: use `fleet sign-device` (or --rotate)"
            )
        if old is not None and old.state == "revoked" and not rotate:
            raise ConfigError(
                f"device {device_id} is revoked: --rotate issues it new keys and a new certificate"
            )
        d = self.fd.device_dir(device_id)
        if rotate and old is not None:
            self._retire(old, d)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (d / "device.key").exists():
            (d / "device.pub").unlink(missing_ok=True)  # a half-made pair from an interrupted run
            generate_keypair("device", d)
        sign_pub = ensure_ed25519(d / "device-sign.key", d / "device-sign.pub")
        tls_key = ensure_ec_key(d / "client.key")
        serial = self._ensure_client_cert(d, tls_key.public_key(), device_id)
        site_serial = self._ensure_site_cert(d, tls_key.public_key(), device_id, _groups(groups, old))
        self._ensure_tokens(d)
        return self._record(
            device_id=device_id,
            groups=groups,
            old=old,
            d=d,
            sign_pub=sign_pub,
            serial=serial,
            site_serial=site_serial,
            enrolled="fleet",
            rotate=rotate,
        )

    def sign_device(
        self, csr_pem: bytes, groups: tuple[str, ...] | None, *, rotate: bool = False
    ) -> DeviceRecord:
        """A certificate for keys made on the device (``edgeguard enroll``): only public halves come in."""
        device_id, tls_pub, device_pub, sign_pub = _parse_csr(csr_pem)
        old = self.inv.devices.get(device_id)
        d = self.fd.device_dir(device_id)
        if old is not None and not rotate:
            if old.state == "revoked":
                raise ConfigError(f"device {device_id} is revoked: --rotate enrols it again with these keys")
            if old.enrolled == "fleet" or old.bundle_key_id != public_key_id(device_pub):
                raise ConfigError(f"device {device_id} is enrolled with other keys: --rotate replaces them")
        if rotate and old is not None:
            self._retire(old, d)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(d / "device.csr", csr_pem, mode=0o644)
        atomic_write(d / "device.pub", device_pub.public_bytes(*_PEM_PUB), mode=0o644)
        atomic_write(d / "device-sign.pub", sign_pub.public_bytes(*_PEM_PUB), mode=0o644)
        serial = self._ensure_client_cert(d, tls_pub, device_id)
        site_serial = self._ensure_site_cert(d, tls_pub, device_id, _groups(groups, old))
        self._ensure_tokens(d)
        return self._record(
            device_id=device_id,
            groups=groups,
            old=old,
            d=d,
            sign_pub=sign_pub,
            serial=serial,
            site_serial=site_serial,
            enrolled="device",
            rotate=rotate,
        )

    def _retire(self, old: DeviceRecord, d: Path) -> None:
        """--rotate: the old certificate goes on the CRL; the old key files go (a new identity follows)."""
        self.inv.revoke_cert(old.cert_serial, old.id, _now())
        if old.site_cert_serial is not None:
            self.inv.revoke_cert(old.site_cert_serial, pki.SITE_CN_PREFIX + old.id, _now())
        for name in (
            "device.key",
            "device.pub",
            "device-sign.key",
            "device-sign.pub",
            "client.key",
            "client.pem",
            "site.pem",
            "api-tokens",
            "device.csr",
        ):
            (d / name).unlink(missing_ok=True)

    def _ensure_client_cert(
        self,
        d: Path,
        public_key: ec.EllipticCurvePublicKey,
        cn: str,
        ou: str = "devices",
        name: str = "client.pem",
    ) -> str:
        cert = read_cert(d / name)
        if cert is not None and cert.public_key() == public_key and pki.subject_cn(cert.subject) == cn:
            return pki.serial_hex(cert)  # same key, same certificate: re-running changes nothing
        if cert is not None and name == "site.pem":  # a site certificate for another key: never valid again
            self._revoke(pki.serial_hex(cert), pki.subject_cn(cert.subject) or cn)
        assert self.ca_key is not None
        cert = pki.issue_client_cert(self.ca_key, self.ca_cert, public_key, cn, ou=ou, fleet=self.cfg.name)
        atomic_write(d / name, pki.cert_pem(cert), mode=0o644)
        return pki.serial_hex(cert)

    def _ensure_site_cert(
        self, d: Path, public_key: ec.EllipticCurvePublicKey, device_id: str, groups: tuple[str, ...]
    ) -> str | None:
        """``site.pem`` (CN ``site:<device>``, same key as ``client.pem``) while the device is in a group;
        out of every group, an existing one is revoked and removed."""
        if groups:
            return self._ensure_client_cert(d, public_key, pki.SITE_CN_PREFIX + device_id, name="site.pem")
        cert = read_cert(d / "site.pem")
        if cert is not None:
            self._revoke(pki.serial_hex(cert), pki.SITE_CN_PREFIX + device_id)
            (d / "site.pem").unlink()
        return None

    def _revoke(self, serial: str, cn: str) -> None:
        """Put a certificate on the inventory's revoked list; the caller writes the CRL (``crl_stale``)."""
        self.inv.revoke_cert(serial, cn, _now())
        self.crl_stale = True

    @staticmethod
    def _ensure_tokens(d: Path) -> None:
        if (d / "api-tokens").exists():
            return
        # The format of sources/_tokens.py (`edgeguard token add`): name, scopes, token; 256 random bits each.
        lines = [
            "# name  scopes  token   (edgeguard token add|list|revoke)",
            f"app infer,status {secrets.token_urlsafe(32)}",
            f"ops admin,status {secrets.token_urlsafe(32)}",
        ]
        atomic_write(d / "api-tokens", ("\n".join(lines) + "\n").encode(), mode=0o600)

    def _record(
        self,
        *,
        device_id: str,
        groups: tuple[str, ...] | None,
        old: DeviceRecord | None,
        d: Path,
        sign_pub: Ed25519PublicKey,
        serial: str,
        site_serial: str | None,
        enrolled: str,
        rotate: bool,
    ) -> DeviceRecord:
        keep = _groups(groups, old)
        rec = DeviceRecord(
            id=device_id,
            groups=tuple(keep),
            bundle_key_id=load_recipient_key(d / "device.pub").key_id,
            signing_key_id=public_key_id(sign_pub),
            cert_serial=serial,
            site_cert_serial=site_serial,
            enrolled="device" if enrolled == "device" else "fleet",
            added=old.added if old is not None and not rotate else _now().isoformat(timespec="seconds"),
        )
        self.inv.devices[device_id] = rec
        return rec

    def write_archive(self, rec: DeviceRecord) -> Path:
        """The device's provisioning archive (0600): plain when the fleet made its keys, sealed (HPKE) to the
        device key when the device enrolled its own (then it holds no private key, only the tokens)."""
        d = self.fd.device_dir(rec.id)
        broker = self.cfg.brokers[0]
        config = render_device_config(
            device_id=rec.id,
            fleet=self.cfg.name,
            groups=rec.groups,
            site=rec.site_cert_serial is not None,
            broker_host=broker.host,
            broker_port=broker.port,
            api_port=self.cfg.device_api_port,
        )
        atomic_write(d / "edgeguard.toml", config.encode(), mode=0o600)
        files: dict[str, tuple[int, bytes]] = {"edgeguard.toml": (0o600, config.encode())}
        public = {
            "fleet-ca.pem": self.fd.ca_cert,
            "publisher.pub": self.fd.publisher_pub,
            "operator.pub": self.fd.operator_pub,
            "device.pub": d / "device.pub",
            "device-sign.pub": d / "device-sign.pub",
            "client.pem": d / "client.pem",
        }
        if rec.site_cert_serial is not None:
            public["site.pem"] = d / "site.pem"
        for name, path in public.items():
            files[name] = (0o644, read_checked(path, what=name, limit=64 * 1024, error=ConfigError).data)
        private = ["api-tokens"] + (
            ["device.key", "device-sign.key", "client.key"] if rec.enrolled == "fleet" else []
        )
        for name in private:
            files[name] = (0o600, read_checked(d / name, what=name, limit=64 * 1024, error=KeyFileError).data)
        seal_to: X25519PublicKey | None = None
        if rec.enrolled == "device":
            seal_to = load_recipient_key(d / "device.pub").public_key
        data = build_archive(
            fleet=self.cfg.name,
            device=rec.id,
            cert_serial=rec.cert_serial,
            files=files,
            sign_key=self.publisher,
            seal_to=seal_to,
        )
        path = self.fd.archive(rec.id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, data, mode=0o600)
        return path

    def revoke_device(self, device_id: str) -> DeviceRecord:
        rec = self.inv.devices.get(device_id)
        if rec is None:
            raise ConfigError(f"no device {device_id!r} in the inventory")
        if rec.state != "revoked":
            now = _now()
            rec.state, rec.revoked_at = "revoked", now.isoformat(timespec="seconds")
            self.inv.revoke_cert(rec.cert_serial, device_id, now)
            if rec.site_cert_serial is not None:
                self.inv.revoke_cert(rec.site_cert_serial, pki.SITE_CN_PREFIX + device_id, now)
        self.write_crl()
        return rec

    # ---------------------------------------------------------------------------------------- operators
    def add_operator(self, name: str) -> tuple[OperatorRecord, Path]:
        if not ID_RE.fullmatch(name):
            raise ConfigError(f"operator name {name[:80]!r}: 1..64 of A-Z a-z 0-9 _ . -")
        old = self.inv.operators.get(name)
        if old is not None and old.state == "revoked":
            raise ConfigError(f"operator {name} is revoked; pick a new name")
        d = self.fd.operator_dir(name)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ensure_ec_key(d / "client.key")
        serial = self._ensure_client_cert(d, key.public_key(), pki.OPERATOR_CN_PREFIX + name, ou="operators")
        rec = OperatorRecord(
            name=name, cert_serial=serial, added=old.added if old else _now().isoformat(timespec="seconds")
        )
        self.inv.operators[name] = rec
        return rec, d

    def revoke_operator(self, name: str) -> OperatorRecord:
        rec = self.inv.operators.get(name)
        if rec is None:
            raise ConfigError(f"no operator {name!r} in the inventory")
        if rec.state != "revoked":
            now = _now()
            rec.state, rec.revoked_at = "revoked", now.isoformat(timespec="seconds")
            self.inv.revoke_cert(rec.cert_serial, pki.OPERATOR_CN_PREFIX + name, now)
        self.write_crl()
        return rec

    def write_crl(self) -> None:
        assert self.ca_key is not None
        revoked = [(r.serial, datetime.fromisoformat(r.at)) for r in self.inv.revoked_certs]
        atomic_write(self.fd.crl, pki.build_crl(self.ca_key, self.ca_cert, revoked), mode=0o644)


def _groups(groups: tuple[str, ...] | None, old: DeviceRecord | None) -> tuple[str, ...]:
    """The groups a device ends up in: those given, else those it had."""
    return tuple(groups if groups is not None else (old.groups if old is not None else ()))


def _parse_csr(csr_pem: bytes) -> tuple[str, ec.EllipticCurvePublicKey, X25519PublicKey, Ed25519PublicKey]:
    """Device id, TLS key and the two device keys from an `edgeguard enroll` CSR (signature first)."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ConfigError(f"CSR of {len(csr_pem)} bytes exceeds {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ConfigError("not a PEM certificate signing request (made by `edgeguard enroll`)") from None
    try:  # the DER is parsed lazily: a damaged key or signature surfaces here as ValueError
        valid = csr.is_signature_valid
        tls = csr.public_key()
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError("the CSR's signature does not verify (damaged or edited)")
    if not isinstance(tls, ec.EllipticCurvePublicKey) or not isinstance(tls.curve, ec.SECP256R1):
        raise ConfigError("the CSR's key must be EC P-256 (as `edgeguard enroll` makes)")
    device_id = pki.subject_cn(csr.subject)
    if device_id is None or not ID_RE.fullmatch(device_id):
        raise ConfigError("the CSR's subject CN is not a device id (1..64 of A-Z a-z 0-9 _ . -)")
    try:
        uris = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    found: dict[str, bytes] = {}
    for uri in uris:
        for prefix in (DEVICE_KEY_URN, SIGN_KEY_URN):
            if uri.startswith(prefix) and _HEX64.fullmatch(uri[len(prefix) :]):
                found[prefix] = bytes.fromhex(uri[len(prefix) :])
    if len(found) != 2:
        raise ConfigError(
            "the CSR lacks the device's bundle and signing keys (make it with `edgeguard enroll`)"
        )
    return (
        device_id,
        tls,
        X25519PublicKey.from_public_bytes(found[DEVICE_KEY_URN]),
        Ed25519PublicKey.from_public_bytes(found[SIGN_KEY_URN]),
    )
