"""``edgeguard run --check``: everything a start would load, loaded the same way, each problem named by key.

The checks call the worker's own loaders (``_loader``), so a config that passes here cannot fail the same way
at start. Nothing is written: the bundle is verified against the rollback floor without raising it, the
outbox and the state directory are not created. Checks that depend on each other run in order (no bundle
check without the keys that open it); independent ones all run, so one pass lists every problem.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from edgeguard.errors import EdgeGuardError
from edgeguard.keys import DeviceKey, TrustStore
from edgeguard.link import tls_context
from edgeguard.profiles import get_profile

from ._loader import load_device_key_of, load_engine, load_tokens, load_trust
from .config import ServiceConfig

__all__ = ["Problem", "check_startup"]

_T = TypeVar("_T")
# systemd credentials exist only inside the unit (LoadCredential=); a --check from a shell cannot see them.
_UNSEEN = "not checked: {key} ($CREDENTIALS_DIRECTORY is set only under systemd)"
Resolver = Callable[[str, int], Any]


@dataclass(frozen=True)
class Problem:
    key: str  # the config key whose value points at the problem, e.g. "sources.api.tokens_file"
    message: str  # one line

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def check_startup(cfg: ServiceConfig, *, resolve: Resolver | None = None) -> tuple[list[Problem], list[str]]:
    """(problems, what was verified or could not be) for ``cfg``; ``resolve`` defaults to
    ``socket.getaddrinfo``. Credentials are looked up in ``os.environ``, as the loaders do."""
    problems: list[Problem] = []
    passed: list[str] = []

    def attempt(key: str | Callable[[str], str], load: Callable[[], _T]) -> _T | None:
        try:
            return load()
        except (EdgeGuardError, OSError, ValueError) as exc:
            message = _one_line(exc)
            problems.append(Problem(key(message) if callable(key) else key, message))
            return None

    _check_dir(cfg.device.state_dir, "device.state_dir", problems)
    trust: TrustStore | None = attempt(lambda message: _trust_key(cfg, message), lambda: load_trust(cfg))
    device_key: DeviceKey | None = None
    if cfg.model.device_key is not None:
        device_key = attempt("model.device_key", lambda: load_device_key_of(cfg))
    elif _no_credentials():
        passed.append(_UNSEEN.format(key="model.device_key_credential") + " (and so not the bundle)")
    else:
        device_key = attempt("model.device_key_credential", lambda: load_device_key_of(cfg))
    profile = cfg.model.profile
    profile_ok = profile is None or attempt("model.profile", lambda: get_profile(profile)) is not None
    if trust is not None and device_key is not None and profile_ok:
        engine = attempt(
            "model.bundle", lambda: load_engine(
                cfg, trust=trust, device_key=device_key, now=datetime.now(timezone.utc), commit_floor=False
            ),
        )
        if engine is not None:
            m, accelerator = engine.manifest, engine.health().get("accelerator")
            engine.close()
            passed.append(f"model {m.name} v{m.version} verified and self-tested on {accelerator}")
    if cfg.api.enabled and cfg.api.tokens_file is None and _no_credentials():
        passed.append(_UNSEEN.format(key="sources.api.tokens_credential"))
    elif cfg.api.enabled:
        api_key = "tokens_file" if cfg.api.tokens_file is not None else "tokens_credential"
        tokens = attempt(f"sources.api.{api_key}", lambda: load_tokens(cfg))
        if tokens is not None:
            passed.append("api tokens parsed")
    if cfg.link.ca_file is not None:
        tls_files = {"ca_file": cfg.link.ca_file, "client_cert": cfg.link.client_cert,
                     "client_key": cfg.link.client_key}
        # Each file readable (its own key named), then all together as the link loads them (PEM, key pair).
        readable = [attempt(f"link.{k}", partial(_readable, p)) for k, p in tls_files.items() if p]
        tls_key = "link.client_cert" if cfg.link.client_cert is not None else "link.ca_file"
        if all(readable) and attempt(tls_key, lambda: tls_context(cfg.link)) is not None:
            passed.append("TLS files loaded")
    resolver = resolve or socket.getaddrinfo
    try:
        resolver(cfg.link.host, cfg.link.port)
        passed.append(f"broker {cfg.link.host}:{cfg.link.port} resolves")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(Problem("link.host", f"cannot resolve broker host {cfg.link.host!r} ({reason})"))
    _check_devices(cfg, problems)
    return problems, passed


def _readable(path: Path) -> bool:
    with path.open("rb"):
        return True


def _no_credentials() -> bool:
    return not os.environ.get("CREDENTIALS_DIRECTORY")


def _trust_key(cfg: ServiceConfig, message: str) -> str:
    # One loader reads the trusted keys and the revocation list: tell the two keys apart by the path named.
    revocations = cfg.model.revocations
    return "model.revocations" if revocations is not None and str(revocations) in message else "model.trust"


def _check_dir(path: Path, key: str, problems: list[Problem]) -> None:
    """The directory exists and is writable, or can be created (its nearest existing parent is writable)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        problems.append(Problem(key, f"{path}: {probe} is not a directory"))
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(Problem(key, f"{path}: {probe} is not writable"))


def _check_devices(cfg: ServiceConfig, problems: list[Problem]) -> None:
    wd = cfg.watchdog
    if wd.device is not None and not wd.device.exists():
        problems.append(Problem("watchdog.device", f"{wd.device}: no such device"))
    if wd.mcu_port is not None and not Path(wd.mcu_port).exists():
        problems.append(Problem("watchdog.mcu_port", f"{wd.mcu_port}: no such device"))
    if cfg.serial.enabled and cfg.serial.port and not Path(cfg.serial.port).exists():
        problems.append(Problem("sources.serial.port", f"{cfg.serial.port}: no such device"))
