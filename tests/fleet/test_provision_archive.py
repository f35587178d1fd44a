"""The provisioning archive gatekeeper on arbitrary bytes: a mutated archive is refused with one typed error,
or (whitespace the signature does not cover) opens to exactly the signed content; never anything else."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeguard.errors import ArchiveRejected
from edgeguard.keys import DeviceKey, PublisherKey, public_key_id
from edgeguard.provisioning import build_archive, open_archive

_SIGNER = Ed25519PrivateKey.generate()
_PUB = PublisherKey(private_key=_SIGNER, key_id=public_key_id(_SIGNER.public_key()))
_DEV = X25519PrivateKey.generate()
_DEVICE_KEY = DeviceKey(private_key=_DEV, key_id=public_key_id(_DEV.public_key()))
_FILES = {"edgeguard.toml": (0o600, b"[device]\nid = 'cam-1'\n"), "client.pem": (0o644, b"-----BEGIN CERT")}


def _archive(sealed: bool) -> bytes:
    return build_archive(
        fleet="plant",
        device="cam-1",
        cert_serial="abc123",
        files=_FILES,
        sign_key=_PUB,
        seal_to=_DEV.public_key() if sealed else None,
    )


PLAIN, SEALED = _archive(False), _archive(True)


def test_both_kinds_open_to_the_signed_files() -> None:
    for data in (PLAIN, SEALED):
        opened = open_archive(data, fleet_key_id=_PUB.key_id, device="cam-1", device_key=_DEVICE_KEY)
        assert dict(opened.files) == _FILES and opened.device == "cam-1" and opened.cert_serial == "abc123"
    assert open_archive(SEALED, fleet_key_id=_PUB.key_id, device_key=_DEVICE_KEY).sealed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A byte that turns the signer's PEM into an unknown key type: cryptography raises UnsupportedAlgorithm, which
# must be a `malformed` refusal like any other bad key (found by this test).
@example(sealed=True, where=0.109375, value=65)
@given(sealed=st.booleans(), where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_a_mutated_byte_is_refused_or_changes_nothing(sealed: bool, where: float, value: int) -> None:
    original = SEALED if sealed else PLAIN
    data = bytearray(original)
    i = int(where * len(data))
    if data[i] == value:
        return
    data[i] = value
    try:
        opened = open_archive(bytes(data), fleet_key_id=_PUB.key_id, device="cam-1", device_key=_DEVICE_KEY)
    except ArchiveRejected as exc:
        assert exc.check in ("malformed", "untrusted signer", "signature", "too large")
        assert "\n" not in str(exc)
        return
    assert dict(opened.files) == _FILES and opened.device == "cam-1"  # e.g. JSON whitespace, not signed


def test_a_sealed_archive_needs_the_recipient_key() -> None:
    other = X25519PrivateKey.generate()
    for key in (None, DeviceKey(private_key=other, key_id=public_key_id(other.public_key()))):
        try:
            open_archive(SEALED, fleet_key_id=_PUB.key_id, device_key=key)
        except ArchiveRejected as exc:
            assert exc.check == "not a recipient"
        else:
            raise AssertionError("opened without the recipient key")
