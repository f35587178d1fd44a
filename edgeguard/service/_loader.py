"""Loading what the config names: keys, API tokens and the model (verified and self-tested)."""

from __future__ import annotations

from pathlib import Path

from edgeguard.bundle import open_bundle
from edgeguard.engine import Engine
from edgeguard.keys import DeviceKey, TrustStore, derive_storage_key, load_device_key
from edgeguard.profiles import get_profile
from edgeguard.sources import TokenStore, credential_path

from ._pipeline import EngineLike
from .config import ServiceConfig

__all__ = ["load_keys", "load_trust", "load_device_key_of", "load_tokens", "load_engine"]


def _device_key_path(cfg: ServiceConfig) -> Path:
    if cfg.model.device_key is not None:
        return cfg.model.device_key
    assert cfg.model.device_key_credential is not None
    return credential_path(cfg.model.device_key_credential)


def load_trust(cfg: ServiceConfig) -> TrustStore:
    return TrustStore.from_files(cfg.model.trust, revocation_list=cfg.model.revocations)


def load_device_key_of(cfg: ServiceConfig) -> DeviceKey:
    return load_device_key(_device_key_path(cfg))


def load_keys(cfg: ServiceConfig) -> tuple[TrustStore, DeviceKey, bytes]:
    trust = load_trust(cfg)
    device_key = load_device_key_of(cfg)
    return trust, device_key, derive_storage_key(device_key)


def load_tokens(cfg: ServiceConfig) -> TokenStore:
    api = cfg.api
    if api.tokens_file is not None:
        return TokenStore.from_file(api.tokens_file)
    assert api.tokens_credential is not None
    # systemd credentials are owned by the service and mode 0400 already; the mode check still applies.
    return TokenStore.from_file(credential_path(api.tokens_credential))


def load_engine(
    cfg: ServiceConfig, *, trust: TrustStore, device_key: DeviceKey, commit_floor: bool = True
) -> EngineLike:
    """open_bundle (all checks) -> Engine.load (fast path + golden self-test); BundleRejected if any fails.
    ``commit_floor=False`` (``run --check``) verifies against the rollback floor without raising it."""
    opened = open_bundle(
        cfg.model.bundle,
        trust=trust,
        device_key=device_key,
        state_dir=cfg.device.state_dir,
        commit_floor=commit_floor,
    )
    profile = get_profile(cfg.model.profile) if cfg.model.profile else None
    return Engine.load(opened, profile=profile)
