"""Wiring: one Follower (fleet view + results + rollouts) feeding a LiveFleet, served by DashboardServer."""

from __future__ import annotations

import asyncio
import signal
import string
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from edgeguard._safeio import read_checked
from edgeguard.errors import ConfigError
from edgeguard.fleet.view import BrokerOptions, FleetState, Follower

from ._actions import Actions
from ._live import LiveFleet
from ._server import DashboardServer

__all__ = ["Dashboard", "read_token_file"]

_TOKEN_MIN, _TOKEN_MAX = 16, 512
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-_.~+/=")


def read_token_file(path: Path) -> str:
    """The operator token: one line of 16..512 URL-safe characters, in a file only its owner can read
    (opened without following links, checked and read with a bound: edgeguard/_safeio.py)."""
    data = read_checked(path, what="token file", limit=_TOKEN_MAX + 2, error=ConfigError, private=True).data
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path}: not ASCII") from None
    if not _TOKEN_MIN <= len(token) <= _TOKEN_MAX or not set(token) <= _TOKEN_CHARS:
        raise ConfigError(
            f"token file {path}: expected one line of {_TOKEN_MIN}..{_TOKEN_MAX} URL-safe characters "
            "(make one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def rollout_filter(fleet: str) -> str:
    return f"edgeguard/v1/{fleet}/rollouts/+"


def results_filter(fleet: str) -> str:
    return f"edgeguard/v1/{fleet}/+/results"


class Dashboard:
    """The running dashboard: ``start()`` connects to the broker (LinkError when it cannot), ``serve()``
    runs the HTTP server until stopped."""

    def __init__(
        self,
        *,
        broker: BrokerOptions,
        fleet: str,
        token: str,
        state: FleetState,
        actions: Actions | None = None,
        history: int = 60,
        update_interval_s: float = 0.25,
    ) -> None:
        self.state = state
        self.live = LiveFleet(state, history=history)
        self.follower = Follower(
            broker=broker, fleet=fleet, state=state, on_event=self.live.on_event,
            extra_filters=(rollout_filter(fleet), results_filter(fleet)), on_message=self.live.on_message,
        )
        self.server = DashboardServer(
            self.live, token=token, fleet=fleet, actions=actions, update_interval_s=update_interval_s
        )
        self.actions = actions

    def start(self) -> None:
        self.follower.start()

    def serve(self, host: str, port: int, on_ready: Callable[[str], None]) -> None:
        asyncio.run(self._serve(host, port, on_ready))

    async def _serve(self, host: str, port: int, on_ready: Callable[[str], None]) -> None:
        runner = web.AppRunner(self.server.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        on_ready(f"http://{shown}:{bound[1]}/")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def close(self) -> None:
        self.follower.stop()
        if self.actions is not None:
            self.actions.close()
