"""Builds the device's remote-command service (docs/commands.md) around a worker: the operator trust store,
the device's answer-signing key (generated in the state dir when ``device.signing_key`` is unset), the nonce
store, and the actions each command runs.

Kept apart from ``_worker`` so the worker holds one ``_commands`` attribute and one reload hook.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard._atomic import atomic_write
from edgeguard.commands import NONCE_FILE, CommandGate, CommandService, NonceStore
from edgeguard.deploy import DeployManager
from edgeguard.errors import CommandRefused, ConfigError, KeyFileError
from edgeguard.keys import TrustStore, load_signing_key, load_verify_key, public_key_id, read_revocation_list
from edgeguard.link import MqttLink

from ._hooks import HookRunner
from ._loader import load_tokens
from .config import ServiceConfig

__all__ = ["build_commands", "load_operators", "answer_key", "CommandHost"]

_log = logging.getLogger("edgeguard.commands")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class CommandHost(Protocol):
    """What the commands need from the worker (a Protocol: this module and ``_worker`` do not import each
    other)."""

    cfg: ServiceConfig
    link: MqttLink
    hooks: HookRunner
    api: Any
    deploy: DeployManager

    def health(self) -> dict[str, Any]: ...

    def request_reload(self) -> bool: ...

    def request_restart(self, reason: str) -> bool: ...


def load_operators(cfg: ServiceConfig) -> TrustStore:
    """From the files' contents, at start and on every reload (an edited revocation list applies then)."""
    c = cfg.commands
    revoked = read_revocation_list(c.revocations) if c.revocations is not None else frozenset()
    return TrustStore([load_verify_key(p, "operator") for p in c.operator_keys], revoked=revoked)


def answer_key(cfg: ServiceConfig) -> Ed25519PrivateKey:
    """``device.signing_key``, or ``<state_dir>/device-sign.key``, generated there (0600, with its .pub) at
    the first start. A configured key that is missing is an error: generating one would silently change the
    identity operators pinned."""
    path = cfg.device.signing_key_path
    if cfg.device.signing_key is None and not path.exists() and not path.is_symlink():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # atomic: a power cut while writing leaves no key (made again next start), never half of one
        atomic_write(path, pem, mode=0o600)
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        atomic_write(path.with_suffix(".pub"), pub, mode=0o644)
        _log.info("generated the answer signing key %s (id %s)", path, public_key_id(key.public_key()))
        return key
    return load_signing_key(path, "device-sign")


class _HookFeed:
    """Runs the hooks for command events one event at a time, from a bounded queue.

    Anyone who can publish on ``cmd`` decides how many refusals there are; one hook thread (and process) per
    refusal would let a flood fork without bound. What does not fit is counted (``hooks_dropped``) and still
    published as an event (the link bounds those)."""

    def __init__(self, hooks: HookRunner, size: int = 64) -> None:
        self._hooks = hooks
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=size)
        self.dropped = 0
        threading.Thread(target=self._run, name="eg-command-hooks", daemon=True).start()

    def put(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((kind, data))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            kind, data = self._queue.get()
            try:
                self._hooks.fire(kind, data, wait=True)
            except Exception:  # a hook problem must not stop the next events' hooks
                _log.exception("command event hooks failed")


def build_commands(
    host: CommandHost, *, now: Callable[[], float] = time.time, key: Ed25519PrivateKey | None = None
) -> CommandService:
    """The service, subscribed on ``cmd``; the caller starts it (and stops it at shutdown). ``now``: the
    wall clock (seconds since the epoch) commands' issued_at / expires_at are checked against."""
    cfg = host.cfg
    key = key or answer_key(cfg)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    host.link.birth_extra = {
        "groups": list(cfg.device.groups),
        "signing_key": {"id": public_key_id(key.public_key()), "ed25519": base64.b64encode(raw).decode()},
    }
    gate = CommandGate(
        operators=load_operators(cfg),
        nonces=NonceStore(cfg.device.state_dir / NONCE_FILE),
        fleet=cfg.device.fleet,
        device_id=cfg.device.id,
        groups=frozenset(cfg.device.groups),
        max_bytes=cfg.commands.max_bytes,
        max_clock_skew_s=cfg.commands.max_clock_skew_s,
    )

    feed = _HookFeed(host.hooks)

    def event(kind: str, data: dict[str, Any]) -> None:
        feed.put(kind, data)
        host.link.publish_event(kind, data)

    def counters() -> dict[str, int]:
        return {**svc.counts, "hooks_dropped": feed.dropped}

    svc = CommandService(
        gate=gate,
        signing_key=key,
        actions=_actions(host, counters),
        after_answer={"restart": lambda: _restart(host)},
        publish_answer=host.link.publish_answer,
        event=event,
        now=now,
    )
    # Up to the link's own limit, so that the gate, not the link, refuses a command over commands.max_bytes
    # (and answers it); larger packets are dropped by the link, which tells on_drop (answered the same way).
    host.link.on_inbound("cmd", svc.handle, on_drop=svc.dropped_by_link)
    return svc


def _restart(host: CommandHost) -> None:
    if not host.request_restart("requested by a remote command"):
        _log.error("restart command: no supervisor to restart this worker")


def _actions(host: CommandHost, counters: Callable[[], dict[str, int]]) -> dict[str, Any]:
    def ping(args: Mapping[str, str]) -> dict[str, Any]:
        return {"pong": True}

    def status(args: Mapping[str, str]) -> dict[str, Any]:
        return {**host.health(), "commands": counters()}

    def reload(args: Mapping[str, str]) -> dict[str, Any]:
        if not host.request_reload():
            raise CommandRefused("failed", "the worker is not running its event loop yet")
        return {"reload": "started"}

    def restart(args: Mapping[str, str]) -> dict[str, Any]:
        return {"restart": "requested"}  # done once the answer is queued (after_answer)

    def set_log_level(args: Mapping[str, str]) -> dict[str, Any]:
        level = args.get("level", "").upper()
        if level not in _LEVELS or set(args) != {"level"}:
            raise CommandRefused("malformed", f"set-log-level takes level=one of {', '.join(_LEVELS)}")
        root = logging.getLogger()
        previous = logging.getLevelName(root.level)
        root.setLevel(level)
        _log.warning("log level set to %s by a remote command (was %s)", level, previous)
        return {"level": level, "previous": previous}

    def rotate_tokens(args: Mapping[str, str]) -> dict[str, Any]:
        return _rotate_tokens(host, args)

    return {
        "ping": ping,
        "status": status,
        "deploy": host.deploy.deploy,  # blocks this (the command) thread until switched or refused
        "rollback": host.deploy.rollback,
        "reload": reload,
        "restart": restart,
        "set-log-level": set_log_level,
        "rotate-tokens": rotate_tokens,
    }


def _rotate_tokens(host: CommandHost, args: Mapping[str, str]) -> dict[str, Any]:
    """New secrets for every API token (or only ``name=NAME``), written atomically at 0600 and applied at
    once. The secrets never leave the device over MQTT: the answer holds names and fingerprints; whoever
    administers the device reads the new secrets from its tokens file."""
    # Lazy: the token file helpers live with the `edgeguard token` command, which imports the service.
    from edgeguard.cli._token_cmds import TokenLine, new_token, read_token_lines, render_line  # noqa: PLC0415

    cfg = host.cfg
    if set(args) - {"name"}:
        raise CommandRefused("malformed", "rotate-tokens takes only name=NAME (default: every token)")
    if not cfg.api.enabled or cfg.api.tokens_file is None:
        raise CommandRefused("unsupported", "no API tokens file here (API disabled or a systemd credential)")
    path = cfg.api.tokens_file
    try:
        lines = read_token_lines(path)
    except (ConfigError, KeyFileError) as exc:
        raise CommandRefused("failed", str(exc)) from None
    only = args.get("name")
    if only is not None and not any(line.name == only for line in lines):
        raise CommandRefused("failed", f"no token named {only!r} on this device")
    out, rotated = [], []
    for line in lines:
        if line.name is None or (only is not None and line.name != only):
            out.append(line)
            continue
        secret = new_token()
        new = TokenLine(render_line(line.name, line.scopes, secret), line.name, line.scopes, secret)
        out.append(new)
        rotated.append({"name": new.name, "scopes": list(new.scopes), "fingerprint": new.fingerprint})
    atomic_write(path, "".join(line.raw + "\n" for line in out).encode(), mode=0o600)
    if host.api is not None:
        host.api.replace_tokens(load_tokens(cfg))
    return {"rotated": rotated, "secrets": f"not sent over MQTT; on the device in {path}"}
