"""The dashboard's HTTP side (aiohttp): operator auth, the static page, Server-Sent Events, actions.

Auth, checked before anything else on every request: ``Authorization: Bearer <token>`` (the token read from
the operator's file), or the session cookie a correct token posted to ``/login`` set (HttpOnly,
SameSite=Strict, random, kept in memory, bounded). Anything else gets 401; for a browser's GET of a page the
401 carries the login form. POSTs of actions also need the ``X-EdgeGuard`` header, which a cross-site form
or script cannot send without a CORS preflight this server never answers.

Live updates: one coalescing task asks ``LiveFleet.changes()`` at most ``1 / update_interval_s`` times a
second and puts the encoded event in every client's queue (``client_queue`` deep). A client whose queue is
full reads too slowly: it is disconnected and counted, never buffered for. Each page starts from a
snapshot event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from ._actions import ACTIONS, ActionBusy, Actions
from ._live import LiveFleet

__all__ = ["DashboardServer", "COOKIE"]

COOKIE = "edgeguard_dashboard"
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STATIC = {
    "dashboard.css": "text/css", "dashboard.js": "text/javascript", "detail.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
_HEADERS = {
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"
}
_SESSION_S = 12 * 3600
_PUMP = web.AppKey("pump", asyncio.Task[None])
_MAX_SESSIONS = 256
_MAX_LOGIN_BYTES = 4096


def _asset(name: str) -> bytes:
    return (resources.files("edgeguard.fleet.dashboard") / "static" / name).read_bytes()


@dataclass(eq=False)
class _Client:
    queue: asyncio.Queue[bytes]
    task: asyncio.Task[Any] | None = field(default=None)


class DashboardServer:
    def __init__(
        self,
        live: LiveFleet,
        *,
        token: str,
        fleet: str,
        actions: Actions | None = None,
        update_interval_s: float = 0.25,
        client_queue: int = 32,
        max_clients: int = 32,
    ) -> None:
        if update_interval_s <= 0 or client_queue < 1 or max_clients < 1:
            raise ValueError("dashboard limits must be positive")
        self.live = live
        self._token = token.encode()
        self.fleet = fleet
        self.actions = actions
        self.update_interval_s = update_interval_s
        self.client_queue = client_queue
        self.max_clients = max_clients
        self._sessions: OrderedDict[str, float] = OrderedDict()  # session id -> expiry (monotonic)
        self._clients: set[_Client] = set()
        self.clients_dropped = 0
        self.updates_sent = 0
        self._assets = {name: _asset(name) for name in (*_STATIC, "index.html", "login.html")}
        self.app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024)
        self.app.router.add_get("/", self._index)
        self.app.router.add_post("/login", self._login)
        self.app.router.add_post("/logout", self._logout)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/api/state", self._state)
        self.app.router.add_get("/api/events", self._events)
        self.app.router.add_get("/api/device/{fleet}/{device}", self._detail)
        self.app.router.add_post("/api/action", self._action)
        self.app.on_startup.append(self._start_pump)
        self.app.on_shutdown.append(self._stop_clients)

    # auth -----------------------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return hmac.compare_digest(header[7:].strip().encode(), self._token)
        session = request.cookies.get(COOKIE)
        if session is None:
            return False
        expiry = self._sessions.get(session)
        return expiry is not None and expiry > time.monotonic()

    def _unauthorized(self, request: web.Request, why: str = "operator token required") -> web.Response:
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return web.Response(
                status=401, body=self._assets["login.html"], content_type="text/html",
                headers={**_HEADERS, "Content-Security-Policy": _LOGIN_CSP, "WWW-Authenticate": "Bearer"},
            )
        return web.json_response(
            {"error": why}, status=401, headers={**_HEADERS, "WWW-Authenticate": "Bearer"}
        )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/login" and request.method == "POST":
            return await handler(request)  # type: ignore[no-any-return]
        if not self._authorized(request):
            return self._unauthorized(request)
        needs_header = request.method == "POST" and request.path != "/logout"
        if needs_header and request.headers.get("X-EdgeGuard") != "1":
            return web.json_response({"error": "missing X-EdgeGuard header"}, status=403, headers=_HEADERS)
        return await handler(request)  # type: ignore[no-any-return]

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is None or request.content_length > _MAX_LOGIN_BYTES:
            return self._unauthorized(request, "login form too large")
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.strip().encode(), self._token):
            await asyncio.sleep(0.5)  # a guess costs time; the token itself is long (checked when read)
            return self._unauthorized(request, "wrong token")
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        for sid, expiry in list(self._sessions.items()):
            if expiry <= now:
                del self._sessions[sid]
        while len(self._sessions) >= _MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the oldest login goes first
        self._sessions[session] = now + _SESSION_S
        response = web.Response(status=303, headers={**_HEADERS, "Location": "/"})
        response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/", max_age=_SESSION_S)
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.Response(status=303, headers={**_HEADERS, "Location": "/"})
        response.del_cookie(COOKIE, path="/")
        return response

    # pages and state ------------------------------------------------------------------------------------
    async def _index(self, _request: web.Request) -> web.Response:
        page = self._assets["index.html"].replace(
            b"{{ACTIONS}}", b"on" if self.actions is not None else b"off"
        )
        return web.Response(body=page, content_type="text/html",
                            headers={**_HEADERS, "Content-Security-Policy": _CSP})

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:  # only the files the package ships, by exact name
            raise web.HTTPNotFound()
        return web.Response(body=self._assets[name], content_type=_STATIC[name], headers=_HEADERS)

    async def _state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.live.snapshot() | self.stats(), headers=_HEADERS)

    def stats(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "actions": self.actions is not None,
            "clients": len(self._clients),
            "clients_dropped": self.clients_dropped,
        }

    async def _detail(self, request: web.Request) -> web.Response:
        fleet, device = request.match_info["fleet"], request.match_info["device"]
        if not (_SEGMENT.fullmatch(fleet) and _SEGMENT.fullmatch(device)):
            raise web.HTTPNotFound()
        doc = self.live.detail(fleet, device)
        if doc is None:
            return web.json_response({"error": "unknown device"}, status=404, headers=_HEADERS)
        return web.json_response(doc, headers=_HEADERS)

    async def _action(self, request: web.Request) -> web.Response:
        if self.actions is None:
            return web.json_response({"error": "actions need --sign-key"}, status=403, headers=_HEADERS)
        try:
            doc = await request.json()
        except ValueError:
            return web.json_response({"error": "body: not JSON"}, status=400, headers=_HEADERS)
        if not isinstance(doc, dict):
            doc = {}
        fleet, device, action, reason = (doc.get(k) for k in ("fleet", "device", "action", "reason"))
        names_ok = all(isinstance(v, str) and _SEGMENT.fullmatch(v) for v in (fleet, device))
        if not names_ok or action not in ACTIONS:
            return web.json_response(
                {"error": f"expected fleet, device and action ({', '.join(ACTIONS)})"},
                status=400, headers=_HEADERS,
            )
        if self.live.state.device(str(fleet), str(device)) is None:
            return web.json_response({"error": "unknown device"}, status=404, headers=_HEADERS)
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(
                None, self.actions.run, str(fleet), str(device), str(action),
                reason if isinstance(reason, str) else None,
            )
        except ActionBusy as exc:
            return web.json_response({"error": str(exc)}, status=409, headers=_HEADERS)
        return web.json_response(answer, headers=_HEADERS)

    # live updates ---------------------------------------------------------------------------------------
    @staticmethod
    def _encode(doc: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= self.max_clients:
            return web.json_response({"error": "too many dashboard clients"}, status=503, headers=_HEADERS)
        response = web.StreamResponse(headers={
            **_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        client = _Client(asyncio.Queue(maxsize=self.client_queue), asyncio.current_task())
        snapshot = self.live.snapshot() | self.stats()
        self._clients.add(client)
        try:
            await response.write(b"retry: 2000\n" + self._encode(snapshot))
            while True:
                try:
                    data = await asyncio.wait_for(client.queue.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    data = b": keep-alive\n\n"  # proxies and the browser see a live stream
                await response.write(data)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
        return response

    def _broadcast(self, data: bytes) -> None:
        for client in list(self._clients):
            try:
                client.queue.put_nowait(data)
            except asyncio.QueueFull:
                # Too slow to keep up: disconnect it (it reconnects and starts from a snapshot) rather than
                # buffer without bound.
                self._clients.discard(client)
                self.clients_dropped += 1
                if client.task is not None:
                    client.task.cancel()

    async def _pump(self) -> None:
        while True:
            await asyncio.sleep(self.update_interval_s)
            if not self._clients:
                continue
            doc = self.live.changes()
            if doc is not None:
                self.updates_sent += 1
                self._broadcast(self._encode(doc | self.stats()))

    async def _start_pump(self, app: web.Application) -> None:
        task = asyncio.get_running_loop().create_task(self._pump())
        app[_PUMP] = task

    async def _stop_clients(self, app: web.Application) -> None:
        app[_PUMP].cancel()
        for client in list(self._clients):
            if client.task is not None:
                client.task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
