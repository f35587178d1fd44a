"""Posture checks on what the config names: the broker connection, the local API and its tokens, and the
owners and modes of keys, tokens, config, hooks and state (docs/security.md, "edgeguard scan").

A check never raises on what it inspects: a missing file is skipped, an unreadable one is a finding.
Evidence names paths, modes, owners and token *names*, never a secret.
"""

from __future__ import annotations

import math
import os
import pwd
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgeguard._net import is_loopback
from edgeguard._safeio import read_checked

from ._findings import Finding
from ._host import HostProbe

if TYPE_CHECKING:  # the service imports this package: no import of it at run time
    from edgeguard.service.config import ServiceConfig

__all__ = ["check_broker", "check_api_bind", "check_tokens", "check_files", "TOKEN_MAX_AGE_DAYS"]

TOKEN_MAX_AGE_DAYS = 365


def _loopback(host: str | None) -> bool:
    return host is None or is_loopback(host)  # None: no TCP listener at all


# --- broker -----------------------------------------------------------------------------------------------


def check_broker(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    link = cfg.link
    local = _loopback(link.host)
    if link.ca_file is None:
        yield Finding(
            "broker-tls",
            "low" if local else "high",
            "MQTT broker connection without TLS",
            f"link.host = {link.host}:{link.port}, no link.ca_file"
            + (" (loopback: traffic stays on this device)" if local else ""),
            "set link.ca_file (and client_cert/client_key for mutual TLS) and use the broker's TLS port",
        )
    if link.username is None and link.client_cert is None:
        yield Finding(
            "broker-anonymous",
            "low" if local else "high",
            "the device connects to the broker anonymously, so the broker accepts anonymous clients",
            f"link.username and link.client_cert are unset ({link.host})",
            "give each device a broker identity (client certificate or username/password) and set "
            "allow_anonymous false on the broker",
        )
    # The link always verifies the broker's name (paho tls_set(cert_reqs=CERT_REQUIRED), tls_insecure
    # never set); a config that could turn it off is reported here should such a key ever exist.
    if link.ca_file is not None and getattr(link, "tls_insecure", False):
        yield Finding(
            "broker-hostname",
            "high",
            "TLS without a host name check: any certificate from the CA is accepted for any broker",
            "link.tls_insecure = true",
            "remove tls_insecure; issue the broker a certificate that names link.host",
        )


# --- API --------------------------------------------------------------------------------------------------


def check_api_bind(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    api = cfg.api
    if api.enabled and not _loopback(api.host):
        yield Finding(
            "api-bind",
            "high",
            "the local API listens beyond loopback",
            f"sources.api.host = {api.host!r}, port {api.port}"
            + (" (allow_non_loopback = true)" if api.allow_non_loopback else ""),
            "bind it to 127.0.0.1 or use sources.api.unix_socket; put a TLS proxy in front if it must be "
            "remote",
        )


def _token_bits(secret: str) -> float:
    """A generous strength estimate: length x log2(distinct characters used)."""
    distinct = len(set(secret))
    return len(secret) * math.log2(distinct) if distinct > 1 else 0.0


def check_tokens(cfg: ServiceConfig, host: HostProbe, *, now: float | None = None) -> Iterator[Finding]:
    api = cfg.api
    if not api.enabled or api.tokens_file is None:
        return  # a systemd credential is copied by systemd with a private mode; nothing to read here
    path = api.tokens_file
    try:
        raw = read_checked(path, what="tokens file", limit=1024 * 1024, error=OSError).data
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        yield Finding(
            "api-tokens",
            "medium",
            "API tokens file unreadable",
            f"{path}: {exc.strerror}",
            "fix the path in sources.api.tokens_file",
        )
        return
    seen: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) != 3:
            continue
        name, _, secret = parts
        if len(secret) < 24 or _token_bits(secret) < 96:
            yield Finding(
                "api-tokens",
                "high",
                f"API token {name!r} is weak",
                f"{len(secret)} characters, {len(set(secret))} distinct (~{_token_bits(secret):.0f} bits)",
                "replace it with a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )
        if secret in seen:
            yield Finding(
                "api-tokens",
                "medium",
                f"API tokens {seen[secret]!r} and {name!r} are the same secret (shared)",
                f"two entries of {path} hold one token value",
                "give every client its own token, so one can be revoked without the other",
            )
        else:
            seen[secret] = name
    age_days = ((now if now is not None else time.time()) - st.st_mtime) / 86400
    if age_days > TOKEN_MAX_AGE_DAYS:
        yield Finding(
            "api-tokens",
            "medium",
            "API tokens are old (not rotated)",
            f"{path} last changed {age_days:.0f} days ago (limit {TOKEN_MAX_AGE_DAYS})",
            "issue new tokens, update the clients, then reload the service (SIGHUP)",
        )


# --- files ------------------------------------------------------------------------------------------------


def _who(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _file_findings(path: Path, what: str, *, secret: bool, directory: bool = False) -> Iterator[Finding]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return  # the service reports missing files itself; the scan judges what exists
    except OSError as exc:
        yield Finding(
            "file-perms",
            "medium",
            f"{what} cannot be inspected",
            f"{path}: {exc.strerror}",
            "check the path and its parent directories",
        )
        return
    mode = stat.S_IMODE(st.st_mode)
    trusted_owners = {0, os.geteuid()}
    if stat.S_ISLNK(st.st_mode):
        yield Finding(
            "file-perms",
            "medium",
            f"{what} is a symbolic link",
            f"{path} -> {os.readlink(path)}",
            "point the config at the real file (keys and tokens are never read through links)",
        )
        return
    if st.st_uid not in trusted_owners:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is owned by another user",
            f"{path} is owned by {_who(st.st_uid)} (expected root or {_who(os.geteuid())})",
            f"chown root {path} (or the service user)",
        )
    if mode & 0o022:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is writable by group or others",
            f"{path} mode {mode:04o}",
            f"chmod go-w {path}",
        )
    if secret and mode & 0o077:
        yield Finding(
            "file-perms",
            "high",
            f"{what} is readable by group or others",
            f"{path} mode {mode:04o}",
            f"chmod {'700' if directory else '600'} {path}",
        )
    if not directory:
        parent = path.parent
        try:
            pst = os.stat(parent)
        except OSError:
            return
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            yield Finding(
                "file-perms",
                "high",
                f"the directory holding {what} is writable by anyone",
                f"{parent} mode {stat.S_IMODE(pst.st_mode):04o}",
                f"chmod o-w {parent}",
            )


def check_files(cfg: ServiceConfig, host: HostProbe) -> Iterator[Finding]:
    m = cfg.model
    if m.device_key is not None:
        yield from _file_findings(m.device_key, "the device key", secret=True)
    if cfg.api.enabled and cfg.api.tokens_file is not None:
        yield from _file_findings(cfg.api.tokens_file, "the API tokens file", secret=True)
    if cfg.link.client_key is not None:
        yield from _file_findings(cfg.link.client_key, "the broker client key", secret=True)
    for pub in m.trust:
        yield from _file_findings(pub, "a trusted publisher key", secret=False)
    if m.revocations is not None:
        yield from _file_findings(m.revocations, "the revocation list", secret=False)
    if cfg.link.ca_file is not None:
        yield from _file_findings(cfg.link.ca_file, "the broker CA file", secret=False)
    yield from _file_findings(cfg.path, "the config file", secret=False)
    hooks = cfg.service.hooks_dir
    if hooks is not None and hooks.is_dir():
        yield from _file_findings(hooks, "the hooks directory", secret=False, directory=True)
        for hook in sorted(hooks.iterdir())[:256]:
            yield from _file_findings(hook, f"hook {hook.name}", secret=False)
    state = cfg.device.state_dir
    if state.is_dir():
        yield from _file_findings(state, "the state directory", secret=False, directory=True)
        mode = stat.S_IMODE(os.stat(state).st_mode)
        if mode & 0o055 and not mode & 0o022:
            yield Finding(
                "file-perms",
                "low",
                "the state directory is readable by group or others",
                f"{state} mode {mode:04o} (outbox and floors are readable; results are encrypted at rest)",
                f"chmod 700 {state}",
            )
