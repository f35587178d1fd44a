"""Loading what the config names: keys, API tokens and the model (verified and self-tested)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from edgeguard.bundle import Manifest, check_model_name, open_bundle
from edgeguard.clock import TrustedClock, parse_time
from edgeguard.engine import BackendOpener, Engine, open_backend
from edgeguard.errors import BundleRejected
from edgeguard.keys import DeviceKey, TrustStore, derive_storage_key, load_device_key
from edgeguard.profiles import get_profile
from edgeguard.sources import TokenStore, credential_path

from ._pipeline import EngineLike
from .config import ServiceConfig

__all__ = ["load_keys", "load_trust", "load_device_key_of", "load_tokens", "load_engine", "serving_problem"]


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
    """Read from the files' contents every time (start and every reload): an edited revocation list or
    trusted ``.pub`` at the same path takes effect at the next reload."""
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
    cfg: ServiceConfig,
    *,
    trust: TrustStore,
    device_key: DeviceKey,
    now: datetime,
    clock: TrustedClock | None = None,
    commit_floor: bool = True,
    opener: BackendOpener | None = None,
    bundle: Path | None = None,
    check: Callable[[Manifest], None] | None = None,
) -> EngineLike:
    """open_bundle (all checks; floor not yet moved) -> Engine.load (fast path + golden self-test) -> commit
    the rollback floor and slot. BundleRejected if any fails.

    The floor moves only once the engine has passed its self-test (docs/bundle.md): a bundle that cannot run
    here must not lock the device out of the version that does. The commit re-checks the floor in the same
    critical section, so a floor raised meanwhile (``verify --commit``) still refuses this version.
    ``commit_floor=False`` (``run --check``) verifies against the floor and the slot without moving them.
    Expiry is judged at ``now`` (the service passes its trusted clock's reading, never earlier than the
    device's time floor); with ``clock``, the bundle's signed creation time then raises that floor.
    ``bundle``: another sealed file than ``model.bundle`` (a deploy slot); ``check``: called with the
    verified manifest before the model is loaded (a deploy refuses versions rolled back before).
    """
    opened = open_bundle(
        bundle or cfg.model.bundle,
        trust=trust,
        device_key=device_key,
        state_dir=cfg.device.state_dir,
        now=now,
        commit_floor=False,
        model_name=cfg.model.name,
    )
    if check is not None:
        try:
            check(opened.manifest)
        except BaseException:
            opened.wipe()
            raise
    created = parse_time(opened.manifest.created)
    if clock is not None and created is not None and commit_floor:
        clock.observe(created, f"bundle {opened.manifest.name} v{opened.manifest.version}")
    profile = get_profile(cfg.model.profile) if cfg.model.profile else None
    # Wipes the plaintext, whether it loads or not. ``opener``: the fault injector's slowed sessions.
    engine = Engine.load(opened, profile=profile, opener=opener or open_backend)
    if not commit_floor:
        return engine
    try:
        opened.commit_rollback_floor()
    except BaseException:
        engine.close()
        raise
    return engine


def serving_problem(
    manifest: Manifest, *, trust: TrustStore, now: datetime, model_name: str | None = None
) -> BundleRejected | None:
    """Why a model that is already serving must stop now, or None: its signer was revoked or is no longer
    trusted (the trust store was rebuilt at a reload), ``model.name`` now names another model, or it is past
    ``not_after``. The same checks and names as opening it would fail with."""
    try:
        trust.signer(manifest.publisher_key_id)
        check_model_name(manifest.name, model_name)
    except BundleRejected as exc:
        return exc
    expires = manifest.expires_at()
    if expires is not None and now > expires:  # valid up to not_after, as when opening it
        what = f"{manifest.name} v{manifest.version}"
        return BundleRejected("expired", f"{what} expired at {manifest.not_after}")
    return None
