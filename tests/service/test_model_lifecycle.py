"""The service's model loader on real bundles and onnxruntime: the floor moves only after the self-test, and
``serving_problem`` (the expiry timer and the reload re-check) under a clock the test controls."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeguard.bundle import Manifest, RollbackFloor
from edgeguard.errors import BundleRejected, ConfigError, EdgeGuardError
from edgeguard.keys import TrustStore, generate_keypair, load_publisher_key
from edgeguard.service._loader import load_engine, load_keys, serving_problem
from edgeguard.service._worker import Worker
from edgeguard.service.config import ServiceConfig, parse_config
from tests.service._env import ensure_keys, tiny_bundle

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def _config(root: Path, **model: str) -> ServiceConfig:
    ensure_keys(root)
    doc = {
        "device": {"id": "d", "state_dir": "state"},
        "model": {"bundle": "model.egm", "trust": ["keys/publisher.pub"], "device_key": "keys/device.key",
                  "profile": "generic-x86_64", **model},
    }
    return parse_config(doc, path=root / "edgeguard.toml")


def test_floor_moves_only_after_the_self_test_passed(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    trust, device_key, _ = load_keys(cfg)
    now = datetime.now(timezone.utc)
    wrong = {"y": np.full((1, 4), 9.0, np.float32)}  # sealed expectation the model cannot meet
    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=7, golden_out=wrong))
    with pytest.raises(EdgeGuardError, match=r"self-test|golden"):
        load_engine(cfg, trust=trust, device_key=device_key, now=now)
    floor = RollbackFloor(cfg.device.state_dir)
    assert floor.get("sensor") == 0 and floor.slot() is None  # v7 never ran here: no lock-out
    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, version=3))
    load_engine(cfg, trust=trust, device_key=device_key, now=now).close()
    assert floor.get("sensor") == 3 and floor.slot() == "sensor"


def test_model_name_refuses_another_name(tmp_path: Path) -> None:
    cfg = _config(tmp_path, name="thermal")
    trust, device_key, _ = load_keys(cfg)
    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path))
    with pytest.raises(BundleRejected) as exc:
        load_engine(cfg, trust=trust, device_key=device_key, now=datetime.now(timezone.utc))
    assert exc.value.check == "wrong model" and "'sensor'" in str(exc.value)
    assert RollbackFloor(cfg.device.state_dir).get("sensor") == 0


def test_serving_problem_under_a_controlled_clock(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    kid = load_publisher_key(tmp_path / "keys/publisher.key").key_id
    trust = TrustStore.from_files([tmp_path / "keys/publisher.pub"])
    m = Manifest(
        format="onnx", name="sensor", version=1, created=T0.isoformat(), payload_sha256="0" * 64,
        payload_size=1, chunk_size=4096, publisher_key_id=kid, recipient_key_ids=("0" * 16,),
        not_after=(T0 + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
    )
    assert serving_problem(m, trust=trust, now=T0) is None
    assert serving_problem(m, trust=trust, now=T0 + timedelta(hours=1)) is None  # valid up to not_after
    expired = serving_problem(m, trust=trust, now=T0 + timedelta(hours=1, seconds=1))
    assert expired is not None and expired.check == "expired" and "expired at" in str(expired)
    assert serving_problem(replace(m, not_after=None), trust=trust, now=T0 + timedelta(days=9999)) is None
    revoked = serving_problem(m, trust=TrustStore.from_files([tmp_path / "keys/publisher.pub"],
                                                              revoked=[kid]), now=T0)
    assert revoked is not None and revoked.check == "revoked"
    generate_keypair("publisher", tmp_path / "other")
    untrusted = serving_problem(m, trust=TrustStore.from_files([tmp_path / "other/publisher.pub"]), now=T0)
    assert untrusted is not None and untrusted.check == "untrusted signer"
    renamed = serving_problem(m, trust=trust, now=T0, model_name="thermal")  # model.name changed at a reload
    assert renamed is not None and renamed.check == "wrong model"
    assert serving_problem(m, trust=trust, now=T0, model_name="sensor") is None


def test_model_name_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.name"):
        _config(tmp_path, name="../x")
    with pytest.raises(ConfigError, match=r"model\.name"):
        _config(tmp_path, name="ok\n")


def test_worker_expiry_timer_follows_the_injected_clock(tmp_path: Path) -> None:
    """The worker's expiry check on a real engine, outbox and (unconnected) link, with the test's clock."""
    cfg = _config(tmp_path)
    clock = [datetime.now(timezone.utc)]
    not_after = clock[0] + timedelta(days=30)
    (tmp_path / "model.egm").write_bytes(tiny_bundle(tmp_path, not_after=not_after))
    worker = Worker(config=cfg, mode="serve", liveness_fd=-1, now=lambda: clock[0])

    async def scenario() -> None:
        worker._loop = asyncio.get_running_loop()
        assert worker._load_model(False) and worker.pipeline.engine is not None
        clock[0] = not_after  # valid up to not_after
        worker._check_serving()
        assert worker.pipeline.engine is not None
        clock[0] = not_after + timedelta(seconds=1)
        worker._check_serving()
        while worker.pipeline.engine is not None or worker._stopping_model is not None:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        health = worker.health()
        assert health["state"] == "no-model" and "expired at" in health["degraded_reason"]
        assert "expired" in worker.pipeline.unavailable_reason
        events = [json.loads(e) for e in worker.link._events]
        kinds = [(e["kind"], e.get("check"), e["reload"]) for e in events]
        assert kinds == [("bundle-accepted", None, False), ("bundle-rejected", "expired", False)]
    finally:
        worker.outbox.close()
