"""The fleet's X.509 pieces (``cryptography.x509``): CA, broker server certificate, device and operator client
certificates, CSR signing, and the CRL.

All keys are EC P-256: every TLS stack and broker (mosquitto, EMQX, cloud IoT brokers) accepts it, and a small
board generates one in milliseconds. Device certificates carry the device id as subject CN (the broker uses it
as the MQTT user name: ``use_identity_as_username``) and OU ``devices``; operator certificates carry CN
``op:<name>`` (``:`` can never be in a device id, so an operator can never pass for a device) and OU
``operators``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "OPERATOR_CN_PREFIX",
    "SITE_CN_PREFIX",
    "new_key",
    "key_pem",
    "cert_pem",
    "new_ca",
    "issue_server_cert",
    "issue_client_cert",
    "build_crl",
    "serial_hex",
    "subject_cn",
]

OPERATOR_CN_PREFIX = "op:"
# The site connection of a device in a group (docs/sites.md): a second certificate for the device's own TLS
# key, so the broker gives it a client id of its own. ":" is not allowed in a device id: no device can be
# named like another's site identity.
SITE_CN_PREFIX = "site:"
CA_DAYS = 20 * 365
LEAF_DAYS = 10 * 365  # boards live long and may sit on a shelf; revocation (the CRL) is what ends a device
CRL_DAYS = 365  # an expired CRL makes mosquitto refuse every client: regenerate it before (docs/fleet.md)
_BACKDATE = timedelta(minutes=10)  # a device whose clock lags a little still accepts a fresh certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def subject_cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _name(cn: str, ou: str | None, fleet: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"EdgeGuard fleet {fleet}")]
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def new_ca(fleet: str, *, now: datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    t = now or datetime.now(timezone.utc)
    key = new_key()
    name = _name(f"EdgeGuard fleet {fleet} CA", None, fleet)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - _BACKDATE)
        .not_valid_after(t + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    now: datetime | None,
) -> x509.CertificateBuilder:
    t = now or datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - _BACKDATE)
        .not_valid_after(t + timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    hosts: Iterable[str],
    *,
    fleet: str,
    now: datetime | None = None,
) -> x509.Certificate:
    """The broker's certificate: every broker address as a SAN (IP address or DNS name)."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    builder = _leaf(
        ca_key=ca_key,
        ca_cert=ca_cert,
        subject=_name("EdgeGuard broker", "brokers", fleet),
        public_key=key.public_key(),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
    )
    return builder.add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(
        ca_key, hashes.SHA256()
    )


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    *,
    ou: str,
    fleet: str,
    now: datetime | None = None,
) -> x509.Certificate:
    builder = _leaf(
        ca_key=ca_key,
        ca_cert=ca_cert,
        subject=_name(cn, ou, fleet),
        public_key=public_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
    )
    return builder.sign(ca_key, hashes.SHA256())


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[tuple[str, datetime]],
    *,
    now: datetime | None = None,
) -> bytes:
    """PEM CRL listing the revoked serials (hex) with their revocation times; valid ``CRL_DAYS``."""
    t = now or datetime.now(timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(t - _BACKDATE)
        .next_update(t + timedelta(days=CRL_DAYS))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)
