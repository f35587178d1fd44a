"""The trusted clock: a persisted time floor that a wound-back or fresh clock cannot go below, on real
bundles, real files and the real service (docs/security.md, "A clock that cannot be wound back")."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeguard.bundle import open_bundle, pack_bundle
from edgeguard.clock import FLOOR_FILE, RUNTIME_EPOCH, TrustedClock, clock_synchronised
from edgeguard.errors import BundleRejected
from edgeguard.keys import (
    TrustStore,
    load_device_key,
    load_publisher_key,
    load_recipient_key,
    load_trusted_key,
)
from tests.service._env import INFER, STATUS, TINY_META, Device, ensure_keys, tiny_bundle, tiny_onnx
from tests.support.broker import MosquittoBroker

UTC = timezone.utc
REAL_NOW = datetime.now(UTC)
NINETEEN_SEVENTY = datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)


class Wall:
    """A settable wall clock and sync state, injected instead of the system's."""

    def __init__(self, t: datetime, synced: bool | None = True) -> None:
        self.t, self.synced = t, synced

    def __call__(self) -> datetime:
        return self.t

    def sync(self) -> bool | None:
        return self.synced


def _seal(root: Path, *, created: datetime, not_after: datetime) -> bytes:
    ensure_keys(root)
    return pack_bundle(
        tiny_onnx(),
        name="sensor",
        version=1,
        sign_key=load_publisher_key(root / "keys/publisher.key"),
        recipients=[load_recipient_key(root / "keys/device.pub")],
        model_format="onnx",
        golden=[{"in": {"x": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)}, "out": {}}],
        meta=TINY_META,
        not_after=not_after,
        now=created,
    )


def _open(root: Path, bundle: bytes, clock: TrustedClock) -> None:
    opened = open_bundle(
        bundle,
        trust=TrustStore([load_trusted_key(root / "keys/publisher.pub")]),
        device_key=load_device_key(root / "keys/device.key"),
        state_dir=None,
        now=clock.now(),
    )
    opened.wipe()


def test_clock_set_back_past_not_after_still_refuses_the_expired_bundle(tmp_path: Path) -> None:
    not_after = REAL_NOW - timedelta(days=2)
    bundle = _seal(tmp_path, created=REAL_NOW - timedelta(days=30), not_after=not_after)
    wall = Wall(REAL_NOW)
    clock = TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync)
    assert clock.checkpoint()  # the device ran with a synchronised clock, past the bundle's expiry
    with pytest.raises(BundleRejected) as exc:
        _open(tmp_path, bundle, clock)
    assert exc.value.check == "expired"
    # The attacker winds the clock back to before not_after and reboots: the persisted floor holds.
    wall.t, wall.synced = not_after - timedelta(days=1), False
    rebooted = TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync)
    assert rebooted.now() == REAL_NOW and rebooted.state().behind_s > 0
    with pytest.raises(BundleRejected) as exc:
        _open(tmp_path, bundle, rebooted)
    assert exc.value.check == "expired"
    # Control: without the floor the same wound-back clock would have accepted it.
    _open(tmp_path, bundle, TrustedClock(state_dir=None, wall=wall, synchronised=wall.sync, epoch=wall.t))


def test_fresh_board_in_1970_refuses_an_expired_bundle_and_accepts_a_valid_one(tmp_path: Path) -> None:
    wall = Wall(NINETEEN_SEVENTY, synced=False)
    clock = TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync)
    assert clock.now() == RUNTIME_EPOCH  # never earlier than the release of the running code
    expired = _seal(
        tmp_path, created=RUNTIME_EPOCH - timedelta(days=60), not_after=RUNTIME_EPOCH - timedelta(days=1)
    )
    with pytest.raises(BundleRejected) as exc:
        _open(tmp_path, expired, clock)
    assert exc.value.check == "expired"
    valid = _seal(tmp_path, created=REAL_NOW, not_after=REAL_NOW + timedelta(days=30))
    _open(tmp_path, valid, clock)  # accepted on the first boot, clock still in 1970
    # Its signed creation time raises the floor (unsynchronised: the wall clock itself is never persisted).
    assert not clock.checkpoint()
    assert clock.observe(REAL_NOW, "bundle sensor v1")
    assert TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync).now() == REAL_NOW


def test_an_unsynchronised_clock_in_the_future_never_poisons_the_floor(tmp_path: Path) -> None:
    valid = _seal(tmp_path, created=REAL_NOW, not_after=REAL_NOW + timedelta(days=30))
    wall = Wall(datetime(2099, 1, 1, tzinfo=UTC), synced=False)  # a bad RTC
    clock = TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync)
    with pytest.raises(BundleRejected):
        _open(tmp_path, valid, clock)  # conservative while the clock is wrong ...
    assert not clock.checkpoint() and not (tmp_path / "state" / FLOOR_FILE).exists()
    wall.t, wall.synced = REAL_NOW, True  # ... but not forever: once the clock is right, it is accepted
    _open(tmp_path, valid, TrustedClock(state_dir=tmp_path / "state", wall=wall, synchronised=wall.sync))


def test_a_signed_time_far_ahead_of_a_synchronised_clock_is_not_taken(tmp_path: Path) -> None:
    wall = Wall(REAL_NOW)
    clock = TrustedClock(state_dir=tmp_path, wall=wall, synchronised=wall.sync)
    assert not clock.observe(REAL_NOW + timedelta(days=400), "a publisher with a wrong clock")
    assert clock.observe(REAL_NOW + timedelta(hours=1), "bundle")
    assert clock.floor == REAL_NOW + timedelta(hours=1)


@pytest.mark.parametrize("plant", ["corrupt", "symlink", "huge"])
def test_an_unusable_floor_file_is_reported_and_never_followed(tmp_path: Path, plant: str) -> None:
    path = tmp_path / FLOOR_FILE
    if plant == "corrupt":
        path.write_text("{not json")
    elif plant == "symlink":
        target = tmp_path / "elsewhere"
        target.write_text(json.dumps({"floor": "2100-01-01T00:00:00+00:00", "source": "x"}))
        path.symlink_to(target)
    else:
        path.write_bytes(b" " * 10_000)
    wall = Wall(REAL_NOW)
    state = TrustedClock(state_dir=tmp_path, wall=wall, synchronised=wall.sync).state()
    assert state.problem is not None and str(path) in state.problem
    assert state.floor == RUNTIME_EPOCH and state.now == REAL_NOW


def test_floor_file_is_private_and_atomic(tmp_path: Path) -> None:
    wall = Wall(REAL_NOW)
    TrustedClock(state_dir=tmp_path, wall=wall, synchronised=wall.sync).checkpoint("shutdown")
    path = tmp_path / FLOOR_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"floor": REAL_NOW.isoformat(), "source": "shutdown"}
    assert [p.name for p in tmp_path.iterdir()] == [FLOOR_FILE]  # no temp file left behind


def test_synchronisation_comes_from_the_timesyncd_marker_or_the_kernel(tmp_path: Path) -> None:
    marker = tmp_path / "synchronized"
    marker.touch()
    assert clock_synchronised(marker) is True
    # Without the marker the kernel's answer (adjtimex) decides; on Linux it is a bool, never an error.
    expected = (True, False) if os.uname().sysname == "Linux" else (None,)
    assert clock_synchronised(tmp_path / "absent") in expected


def test_service_with_its_clock_behind_the_floor_refuses_a_bundle_expired_by_it(tmp_path: Path) -> None:
    """The real service: the device once saw a time later than the bundle's not_after (its floor); the
    wall clock now reads earlier (set back). The bundle is refused as expired and the service keeps
    answering health requests."""
    not_after = REAL_NOW + timedelta(hours=1)
    bundle = _seal(tmp_path, created=REAL_NOW - timedelta(days=1), not_after=not_after)
    (tmp_path / "state").mkdir()
    floor = {"floor": (not_after + timedelta(hours=1)).isoformat(), "source": "checkpoint"}
    (tmp_path / "state" / FLOOR_FILE).write_text(json.dumps(floor))
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(bundle)
        dev.start()
        try:
            dev.wait(dev.api_up, 90, "the API")
            code, doc = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 503 and doc["state"] == "no-model", doc  # health is not OK without a model
            assert "expired" in doc["degraded_reason"], doc
            body = b'{"inputs": {"x": [[0, 0, 0, 0]]}}'
            assert dev.request("POST", "/v1/infer", body, token=INFER)[0] == 503
        finally:
            dev.stop()
    # Control: the same bundle without the floor is served (so the refusal above came from the floor).
    (tmp_path / "state" / FLOOR_FILE).unlink()
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(bundle)
        dev.start()
        try:
            dev.wait_ready()
        finally:
            dev.stop()


def test_tiny_bundle_helper_still_opens_with_the_default_clock(tmp_path: Path) -> None:
    _open(tmp_path, tiny_bundle(tmp_path), TrustedClock(state_dir=None))


def test_a_floor_that_cannot_be_written_holds_in_memory_and_is_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FLOOR_FILE).mkdir()  # os.replace onto a directory fails, like a read-only or full disk would
    wall = Wall(REAL_NOW)
    clock = TrustedClock(state_dir=state, wall=wall, synchronised=wall.sync)
    assert clock.observe(REAL_NOW + timedelta(hours=1), "bundle")  # no exception into the model load
    assert clock.floor == REAL_NOW + timedelta(hours=1)
    problem = clock.state().problem
    assert problem is not None and "not written" in problem
