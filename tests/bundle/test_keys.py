"""Key files: modes, kinds, refusal of readable private keys, trust store, storage key derivation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgeguard.bundle import BundleLimits
from edgeguard.errors import BundleRejected, KeyFileError
from edgeguard.keys import (
    KeyKind,
    TrustStore,
    derive_storage_key,
    generate_keypair,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
    public_key_id,
    read_revocation_list,
)


def test_keygen_writes_0600_private_and_pem_public(tmp_path: Path) -> None:
    kinds: tuple[KeyKind, ...] = ("publisher", "device")
    for kind in kinds:
        key, pub, kid = generate_keypair(kind, tmp_path)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
        assert len(kid) == 16 and int(kid, 16) >= 0
    assert load_publisher_key(tmp_path / "publisher.key").key_id == public_key_id(
        load_trusted_key(tmp_path / "publisher.pub")
    )
    assert (
        load_device_key(tmp_path / "device.key").key_id == load_recipient_key(tmp_path / "device.pub").key_id
    )
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair("device", tmp_path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    generate_keypair("device", tmp_path)
    os.chmod(tmp_path / "device.key", mode)
    with pytest.raises(KeyFileError, match=r"too open.*chmod 600"):
        load_device_key(tmp_path / "device.key")


def test_wrong_kind_missing_and_garbage(tmp_path: Path) -> None:
    generate_keypair("publisher", tmp_path)
    generate_keypair("device", tmp_path)
    with pytest.raises(KeyFileError, match="expected a device"):
        load_device_key(tmp_path / "publisher.key")
    with pytest.raises(KeyFileError, match="expected a publisher"):
        load_publisher_key(tmp_path / "device.key")
    with pytest.raises(KeyFileError, match="expected a publisher"):
        load_trusted_key(tmp_path / "device.pub")
    with pytest.raises(KeyFileError, match="expected a device"):
        load_recipient_key(tmp_path / "publisher.pub")
    with pytest.raises(KeyFileError, match="not found"):
        load_device_key(tmp_path / "nope.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"hello")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_device_key(junk)


def test_trust_store_rotation_and_revocation(tmp_path: Path) -> None:
    generate_keypair("publisher", tmp_path / "old")
    generate_keypair("publisher", tmp_path / "new")
    old, new = (
        load_trusted_key(tmp_path / "old/publisher.pub"),
        load_trusted_key(tmp_path / "new/publisher.pub"),
    )
    store = TrustStore([old, new], revoked=[public_key_id(old)])
    assert store.signer(public_key_id(new)) is new
    with pytest.raises(BundleRejected) as exc:
        store.signer(public_key_id(old))
    assert exc.value.check == "revoked"
    with pytest.raises(BundleRejected) as exc:
        store.signer("00" * 8)
    assert exc.value.check == "untrusted signer"


def test_revocation_list_format(tmp_path: Path) -> None:
    f = tmp_path / "revoked"
    f.write_text("# revoked publisher keys\n\nA1B2C3D4E5F60718  # laptop stolen\n0011223344556677\n")
    assert read_revocation_list(f) == {"a1b2c3d4e5f60718", "0011223344556677"}
    f.write_text("not-a-key-id\n")
    with pytest.raises(KeyFileError, match=":1:"):
        read_revocation_list(f)


def test_revocation_list_read_like_a_key_file(tmp_path: Path) -> None:
    # Read at every reload: a FIFO in its place must not hang the reload, a device must not flood it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_revocation_list(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_revocation_list(Path("/dev/zero"))
    with pytest.raises(KeyFileError, match="directory"):
        read_revocation_list(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(KeyFileError, match="larger than the limit"):
        read_revocation_list(big)
    with pytest.raises(KeyFileError, match=r"revocation list .* not found"):
        read_revocation_list(tmp_path / "missing")


def test_storage_key_is_stable_per_device_and_distinct(tmp_path: Path) -> None:
    generate_keypair("device", tmp_path / "a")
    generate_keypair("device", tmp_path / "b")
    a1 = derive_storage_key(load_device_key(tmp_path / "a/device.key"))
    a2 = derive_storage_key(load_device_key(tmp_path / "a/device.key"))
    b = derive_storage_key(load_device_key(tmp_path / "b/device.key"))
    assert len(a1) == 32 and a1 == a2 and a1 != b


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        BundleLimits(min_chunk_size=4096, max_chunk_size=1024)
    with pytest.raises(ValueError):
        BundleLimits(max_model_bytes=0)
    with pytest.raises(TypeError):
        BundleLimits(1024)  # type: ignore[call-arg]
