"""What the device accepts: the model name (``model_name`` / the pinned slot), a floor that vanished, and the
floor check and commit as one critical section. Real bundles, real state files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeguard.bundle import RollbackFloor, open_bundle, pack_bundle, verify_bundle
from edgeguard.bundle import _open as open_mod
from edgeguard.errors import BUNDLE_CHECKS, BundleRejected, ConfigError
from tests.bundle.conftest import Party


def _pack(party: Party, model: bytes, name: str, version: int) -> bytes:
    return pack_bundle(
        model, name=name, version=version, sign_key=party.publisher, recipients=[party.recipient]
    )


def _open(party: Party, bundle: bytes, state: Path, **kw: object) -> object:
    return open_bundle(bundle, trust=party.trust, device_key=party.device, state_dir=state, **kw)  # type: ignore[arg-type]


def test_commit_refuses_a_version_below_a_floor_committed_meanwhile(
    party: Party, tiny_model: bytes, tmp_path: Path
) -> None:
    opened = open_bundle(
        _pack(party, tiny_model, "t", 1), trust=party.trust, device_key=party.device, state_dir=tmp_path,
        commit_floor=False,
    )
    RollbackFloor(tmp_path).raise_to("t", 2)  # e.g. `verify --commit` of v2 while v1 was being opened
    with pytest.raises(BundleRejected) as exc:
        opened.commit_rollback_floor()
    assert exc.value.check == "rollback" and "below this device's floor v2" in str(exc.value)
    assert RollbackFloor(tmp_path).get("t") == 2


def test_open_racing_a_commit_never_returns_a_version_below_it(
    party: Party, tiny_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = open_mod._ChunkPass.run

    def commit_meanwhile(self: object, threads: int) -> None:
        # Another opener commits v2 after this open checked the floor (0) and before it commits v1.
        RollbackFloor(tmp_path).raise_to("t", 2)
        real_run(self, threads)  # type: ignore[arg-type]

    monkeypatch.setattr(open_mod._ChunkPass, "run", commit_meanwhile)
    with pytest.raises(BundleRejected) as exc:
        _open(party, _pack(party, tiny_model, "t", 1), tmp_path)
    assert exc.value.check == "rollback"
    assert RollbackFloor(tmp_path).get("t") == 2


def test_model_name_and_pinned_slot_refuse_other_names(
    party: Party, tiny_model: bytes, tmp_path: Path
) -> None:
    assert "wrong model" in BUNDLE_CHECKS
    a5, b1 = _pack(party, tiny_model, "a", 5), _pack(party, tiny_model, "b", 1)
    with pytest.raises(BundleRejected) as exc:  # model.name set: another name is refused before decryption
        verify_bundle(a5, trust=party.trust, model_name="b")
    assert exc.value.check == "wrong model" and "model.name = 'b'" in str(exc.value)
    _open(party, a5, tmp_path)  # a fresh device pins its slot to the first name it serves
    floor = RollbackFloor(tmp_path)
    assert floor.slot() == "a" and floor.get("a") == 5
    with pytest.raises(BundleRejected) as exc:  # the renamed older bundle: its own floor is 0
        _open(party, b1, tmp_path)
    assert exc.value.check == "wrong model" and "pinned to 'a'" in str(exc.value)
    assert floor.get("b") == 0 and floor.slot() == "a"  # nothing committed
    _open(party, b1, tmp_path, model_name="b")  # the operator sets model.name: re-pinned
    assert floor.slot() == "b"
    (tmp_path / "model-slot").unlink()  # the documented explicit reset keeps the floors
    with pytest.raises(BundleRejected) as exc:
        _open(party, _pack(party, tiny_model, "a", 4), tmp_path)
    assert exc.value.check == "rollback"


def test_vanished_floor_is_refused_not_read_as_zero(party: Party, tiny_model: bytes, tmp_path: Path) -> None:
    _open(party, _pack(party, tiny_model, "t", 5), tmp_path)
    (tmp_path / "rollback" / "t").unlink()
    old = _pack(party, tiny_model, "t", 1)
    for bundle in (old, _pack(party, tiny_model, "t", 5)):
        with pytest.raises(BundleRejected) as exc:
            _open(party, bundle, tmp_path)
        assert exc.value.check == "rollback" and "vanished" in str(exc.value) and "v5" in str(exc.value)
    with pytest.raises(BundleRejected):
        verify_bundle(old, trust=party.trust, state_dir=tmp_path)
    # The whole floor directory gone: the same.
    os.rmdir(tmp_path / "rollback")
    with pytest.raises(BundleRejected, match="vanished"):
        _open(party, old, tmp_path)
    # The operator restores the floor file; the second record deleted instead: the floor file still holds.
    (tmp_path / "rollback").mkdir()
    (tmp_path / "rollback" / "t").write_text("5\n")
    _open(party, _pack(party, tiny_model, "t", 5), tmp_path)
    (tmp_path / "rollback.json").unlink()
    with pytest.raises(BundleRejected) as exc:
        _open(party, old, tmp_path)
    assert exc.value.check == "rollback" and "floor v5" in str(exc.value)
    _open(party, _pack(party, tiny_model, "t", 6), tmp_path)
    assert RollbackFloor(tmp_path).get("t") == 6 and (tmp_path / "rollback.json").exists()


def test_state_files_are_not_followed(party: Party, tiny_model: bytes, tmp_path: Path) -> None:
    (tmp_path / "rollback").mkdir()
    (tmp_path / "rollback" / "t").symlink_to("/dev/zero")
    with pytest.raises(ConfigError):
        RollbackFloor(tmp_path).get("t")
    (tmp_path / "model-slot").symlink_to("/dev/zero")
    with pytest.raises(ConfigError):
        RollbackFloor(tmp_path).slot()
