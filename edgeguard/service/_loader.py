"""Loading what the config names: keys, API tokens and the model (verified and self-tested)."""

from __future__ import annotations

from pathlib import Path

from edgeguard.bundle import open_bundle
from edgeguard.clock import TrustedClock, parse_time
from edgeguard.engine import Engine
from edgeguard.keys import DeviceKey, TrustStore, derive_storage_key, load_device_key
from edgeguard.profiles import get_profile
from edgeguard.sources import TokenStore, credential_path

from ._pipeline import EngineLike
from .config import ServiceConfig

__all__ = ["load_keys", "load_tokens", "load_engine"]


def _device_key_path(cfg: ServiceConfig) -> Path:
    if cfg.model.device_key is not None:
        return cfg.model.device_key
    assert cfg.model.device_key_credential is not None
    return credential_path(cfg.model.device_key_credential)


def load_keys(cfg: ServiceConfig) -> tuple[TrustStore, DeviceKey, bytes]:
    trust = TrustStore.from_files(cfg.model.trust, revocation_list=cfg.model.revocations)
    device_key = load_device_key(_device_key_path(cfg))
    return trust, device_key, derive_storage_key(device_key)


def load_tokens(cfg: ServiceConfig) -> TokenStore:
    api = cfg.api
    if api.tokens_file is not None:
        return TokenStore.from_file(api.tokens_file)
    assert api.tokens_credential is not None
    # systemd credentials are owned by the service and mode 0400 already; the mode check still applies.
    return TokenStore.from_file(credential_path(api.tokens_credential))


def load_engine(
    cfg: ServiceConfig, *, trust: TrustStore, device_key: DeviceKey, clock: TrustedClock | None = None
) -> EngineLike:
    """open_bundle (all checks) -> Engine.load (fast path + golden self-test); BundleRejected if any fails.

    With ``clock``, expiry is judged at ``clock.now()`` (never earlier than the device's time floor) and the
    bundle's signed creation time then raises that floor."""
    opened = open_bundle(
        cfg.model.bundle,
        trust=trust,
        device_key=device_key,
        state_dir=cfg.device.state_dir,
        now=clock.now() if clock is not None else None,
    )
    created = parse_time(opened.manifest.created)
    if clock is not None and created is not None:
        clock.observe(created, f"bundle {opened.manifest.name} v{opened.manifest.version}")
    profile = get_profile(cfg.model.profile) if cfg.model.profile else None
    return Engine.load(opened, profile=profile)
