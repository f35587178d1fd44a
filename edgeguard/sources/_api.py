"""The local inference API (aiohttp): the only parser of HTTP requests from applications on the device.

Routes (``docs/openapi.json`` describes them; :data:`OPENAPI` is the same document):
  POST /v1/infer           scope infer   JSON / .npy / image body -> result (also queued for MQTT)
  GET  /v1/health          scope status  health of every stage
  POST /v1/explain         scope explain PNG/JPEG body -> which regions decide the answer (occlusion heatmap;
                                         forward passes capped by ``explain_max_passes``; not queued for MQTT)
  POST /v1/admin/{action}  scope admin   reload, and whatever else the service registers
  GET  /v1/openapi.json    no auth       this API's description

Order of checks: route -> client locked out (429 with Retry-After) -> token (401) -> scope (403) -> the
token's query budget and rate limit for /v1/infer and /v1/explain (429 with Retry-After, ``_budget``) ->
declared size (413) -> capacity (503: requests and body bytes in flight) -> body read with the same limit
(413) -> parse (400/415) -> engine (400 for a rejected input, 500 for a backend error).

The event loop only moves bytes: parsing (JSON -> numpy, .npy, base64) runs on ``parse_threads`` threads and
inference on ``infer_threads``. The worker's liveness reports are written from this loop, so a body parsed on
it would stall them (32 concurrent 15 MiB JSON bodies starved liveness until the supervisor restarted the
worker into the crash-loop safe state). Memory is bounded in bytes, not only in requests: a request is
admitted only if its declared size (``max_body_bytes`` when it declares none, e.g. chunked) fits in
``max_bytes_in_flight`` beside the bodies already admitted; otherwise it is answered 503 before its body is
read.

Authentication failures (401, 403) are counted per client (``_abuse``): a burst locks the client out with
exponential backoff (429 + ``Retry-After``, event ``api-lockout``); each refused token is an event
``token-refused`` until then; a token whose request rate jumps far above its own baseline raises
``api-rate-anomaly``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeguard._echo import cut, echo
from edgeguard._net import is_loopback
from edgeguard.bundle.manifest import TensorSpec
from edgeguard.errors import (
    AdversarialInput,
    BackendError,
    ConfigError,
    InputRejected,
    OutboxError,
    ServiceUnavailable,
)

from ._abuse import AbuseConfig, LockoutTable, RateWatch
from ._budget import QueryBudgets
from ._openapi import OPENAPI
from ._request import BodyLimits, InferenceSink, UnsupportedMediaType, parse_body
from ._tokens import TokenStore

__all__ = ["ApiConfig", "ApiSource", "AdminHandler", "Explainer"]

_log = logging.getLogger("edgeguard.sources.api")
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, with its terminating NUL

AdminHandler = Callable[[str, dict[str, Any]], dict[str, Any]]
# (PNG/JPEG body, forward passes at most) -> the explanation's JSON (edgeguard.explain.explain_image_bytes)
Explainer = Callable[[bytes, int], dict[str, Any]]
_IMAGE_TYPES = ("image/png", "image/jpeg")
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    unix_socket: Path | None = None
    host: str | None = "127.0.0.1"
    port: int = 8780
    allow_non_loopback: bool = False  # refuse to listen beyond the device unless set on purpose
    limits: BodyLimits = field(default_factory=BodyLimits)
    max_in_flight: int = 32  # requests admitted at once; more get 503 instead of an unbounded queue
    # Body bytes admitted at once (declared sizes; max_body_bytes for a body of unknown size); more get 503.
    max_bytes_in_flight: int = 64 * 1024 * 1024
    infer_threads: int = 2
    # Request bodies parsed at once, off the event loop: a 16 MiB JSON body costs several times that while it
    # becomes an array, so this bounds that working set.
    parse_threads: int = 1
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    # Forward passes one POST /v1/explain may cost (the image + the occlusion grid); 0 turns the route off.
    explain_max_passes: int = 65

    def __post_init__(self) -> None:
        if self.unix_socket is None and self.host is None:
            raise ValueError("the local API needs a unix_socket, a host, or both")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if not 1 <= self.max_in_flight <= 4096:
            raise ValueError("max_in_flight must be 1..4096")
        if not 1 <= self.infer_threads <= 64:
            raise ValueError("infer_threads must be 1..64")
        if not 1 <= self.parse_threads <= 64:
            raise ValueError("parse_threads must be 1..64")
        if self.explain_max_passes != 0 and not 2 <= self.explain_max_passes <= 4097:
            raise ValueError("explain_max_passes must be 0 (off) or 2..4097")
        if not self.limits.max_body_bytes <= self.max_bytes_in_flight <= 1 << 32:
            raise ValueError("max_bytes_in_flight must be max_body_bytes .. 4 GiB")
        if self.host is not None and not self.allow_non_loopback and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address (set allow_non_loopback to expose it)"
            )


SOCKET_MODE = 0o660  # the service user and its group (clients join the group)


def bind_unix_socket(path: Path, mode: int = SOCKET_MODE) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at ``path`` that has ``mode`` from the moment anyone can reach it.

    ``bind`` creates the node with whatever the umask allows and ``chmod`` after it follows a symbolic link
    that someone swapped in meanwhile. So the socket is bound in a fresh private directory (0700, next to
    ``path``), given its mode there, and renamed into place: ``rename`` replaces a stale socket or a symbolic
    link planted at ``path`` atomically and never follows it. Anything else at ``path`` (a file, a
    directory) is refused rather than destroyed. Returns the socket and the node's (device, inode).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise ConfigError(f"sources.api.unix_socket: {path} exists and is not a socket (remove it)")
    private = Path(tempfile.mkdtemp(prefix=".eg", dir=path.parent))  # mode 0700, a name no one else has
    staged = private / "s"
    try:
        if len(os.fsencode(staged)) >= _SUN_PATH_MAX:
            raise ConfigError(f"sources.api.unix_socket: {path} is too long for a Unix socket path")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(staged))
            os.chmod(staged, mode)  # inside the private directory: nobody can have put a link there
            os.rename(staged, path)
            node = os.lstat(path)
        except BaseException:
            sock.close()
            raise
    finally:
        staged.unlink(missing_ok=True)
        private.rmdir()
    return sock, (node.st_dev, node.st_ino)


def _unlink_if_ours(path: Path, inode: tuple[int, int] | None) -> None:
    # A later worker may already have put its own socket at the path: never remove that one.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if inode is not None and (st.st_dev, st.st_ino) == inode:
        path.unlink(missing_ok=True)


def _error(status: int, reason: str, **headers: str) -> web.Response:
    # Cut here too: a reason that quotes request text must not turn a small request into a large answer.
    return web.json_response({"error": cut(reason), "status": status}, status=status, headers=headers or None)


class ApiSource:
    """Serves the local API until :meth:`stop`; counters feed the heartbeat."""

    name = "api"

    def __init__(
        self,
        *,
        config: ApiConfig,
        tokens: TokenStore,
        sink: InferenceSink,
        specs: Callable[[], Sequence[TensorSpec]],
        health: Callable[[], dict[str, Any]],
        admin: AdminHandler | None = None,
        explainer: Explainer | None = None,
        on_event: EventSink | None = None,
        monotonic: Callable[[], float] | None = None,
        budgets: QueryBudgets | None = None,
    ) -> None:
        self.config = config
        self._on_event = on_event
        # Per-token query budgets (docs/security.md, "Query budgets and rate limits"); None: no limits.
        self._budgets = budgets if budgets is not None and budgets.config.enabled else None
        self._persister: asyncio.Task[None] | None = None
        clock = monotonic or time.monotonic
        self._lockouts = LockoutTable(config.abuse, now=clock)
        self._rates = RateWatch(config.abuse, now=clock)
        self._tokens = tokens
        self._sink = sink
        self._specs = specs
        self._health = health
        self._admin = admin
        self._explainer = explainer
        self._executor = ThreadPoolExecutor(max_workers=config.infer_threads, thread_name_prefix="eg-api")
        self._parser = ThreadPoolExecutor(max_workers=config.parse_threads, thread_name_prefix="eg-api-parse")
        self._runner: web.AppRunner | None = None
        self._bytes_in_flight = 0  # declared body bytes of the requests admitted now
        self._in_flight = 0
        self.counts: dict[str, int] = {
            "ok": 0,
            "400": 0,
            "401": 0,
            "403": 0,
            "413": 0,
            "415": 0,
            "429": 0,
            "500": 0,
            "503": 0,
        }
        self.bound: list[str] = []
        self.accepting = False
        self._socket_inode: tuple[int, int] | None = None  # the Unix socket node this source created

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(
            client_max_size=self.config.limits.max_body_bytes,
            middlewares=[self._json_errors_middleware, self._auth_middleware],  # first is outermost
        )
        app.router.add_post("/v1/infer", self._infer)
        app.router.add_post("/v1/explain", self._explain)
        app.router.add_get("/v1/health", self._get_health)
        app.router.add_post("/v1/admin/{action}", self._post_admin)
        app.router.add_get("/v1/openapi.json", self._openapi)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
        await runner.setup()
        self._runner = runner
        if self.config.unix_socket is not None:
            path = self.config.unix_socket
            listener, self._socket_inode = bind_unix_socket(path)
            site: web.BaseSite = web.SockSite(runner, listener)
            await site.start()
            self.bound.append(f"unix:{path}")
        if self.config.host is not None:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
            server = getattr(site, "_server", None)
            port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else 0
            self.bound.append(f"http://{self.config.host}:{port}")
        if self._budgets is not None:
            self._persister = asyncio.get_running_loop().create_task(self._persist_budgets())
        self.accepting = True

    @property
    def port(self) -> int:
        for b in self.bound:
            if b.startswith("http://"):
                return int(b.rsplit(":", 1)[1])
        return 0

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (aiohttp drains them), then release the threads."""
        self.accepting = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._persister is not None:
            self._persister.cancel()
            self._persister = None
        if self._budgets is not None:
            self._budgets.persist(clean=True)  # no worst case to assume at the next start
        self._executor.shutdown(wait=True)
        self._parser.shutdown(wait=True)
        if self.config.unix_socket is not None:
            _unlink_if_ours(self.config.unix_socket, self._socket_inode)

    async def _persist_budgets(self) -> None:
        budgets = self._budgets
        assert budgets is not None
        while True:
            await asyncio.sleep(budgets.config.persist_interval_s)
            if budgets.dirty:
                budgets.persist()

    def replace_tokens(self, tokens: TokenStore) -> None:
        """Token rotation on reload: requests from now on are checked against ``tokens``."""
        self._tokens = tokens

    def snapshot(self) -> dict[str, Any]:
        return {
            "bound": list(self.bound),
            "in_flight": self._in_flight,
            "bytes_in_flight": self._bytes_in_flight,
            "responses": dict(self.counts),
        }

    def security(self) -> dict[str, Any]:
        """The API's part of the health and heartbeat ``security`` block."""
        return {
            "auth_failures": self._lockouts.failures,
            "lockouts": self._lockouts.lockouts,
            "locked_clients": self._lockouts.locked_clients(),
            "last_lockout": self._lockouts.last,
            "rate_anomalies": self._rates.anomalies,
            "budgets": self._budgets.snapshot() if self._budgets is not None else {"enabled": False},
        }

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, data)

    # -- error bodies ----------------------------------------------------------------------------------
    @web.middleware
    async def _json_errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # aiohttp's router answers an unknown path (404) or method (405) by raising an HTTPException whose
        # body is plain text; the API documents one error body for every refusal, so convert them here.
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects and the like are not errors
            if isinstance(exc, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(exc.allowed_methods))
                reason = f"method {request.method} not allowed here; allowed: {allowed}"
                return self._count(_error(exc.status, reason, Allow=allowed))
            if isinstance(exc, web.HTTPNotFound):
                return self._count(_error(exc.status, "no such endpoint (see GET /v1/openapi.json)"))
            return self._count(_error(exc.status, exc.reason))
        return response

    # -- access control --------------------------------------------------------------------------------
    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        scope = _required_scope(request)
        if scope is not None:
            client = _client_of(request)
            wait = self._lockouts.retry_after(client)
            # Every local process shares the loopback address: a hard lockout there would let any local user
            # lock every local application out, so by default a locked-out loopback client only has its
            # failures answered with Retry-After (and reported) while its valid tokens are still served.
            hard = not is_loopback(client) or self.config.abuse.lockout_loopback
            if wait > 0 and hard:
                # Before the token is looked at: a locked-out client learns nothing more, at no cost.
                retry = str(math.ceil(wait))
                return self._count(_error(429, f"too many failed authentications; retry in {retry} s",
                                          **{"Retry-After": retry}))
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or not header[7:].strip():
                return self._refused(client, 401, "missing bearer token", None,
                                     **{"WWW-Authenticate": "Bearer"})
            token = self._tokens.authenticate(header[7:].strip())
            if token is None:
                return self._refused(client, 401, "invalid token", None,
                                     **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
            if scope not in token.scopes:
                lacks = f"token {token.name!r} lacks the {scope!r} scope"
                return self._refused(client, 403, lacks, token.name)
            anomaly = self._rates.hit(token.name)
            if anomaly is not None:
                _log.warning("request rate anomaly for token %r: %s", token.name, anomaly)
                self._event("api-rate-anomaly", {**anomaly, "client": client})
            if scope in ("infer", "explain") and self._budgets is not None:
                # After authentication (an unknown token costs no one's budget), before the body is read.
                # An explanation names the top class or box, so it is a query too.
                decision = self._budgets.take(token.name)
                if not decision.ok:
                    return self._count(_error(429, decision.reason,
                                              **{"Retry-After": str(decision.retry_after)}))
                if decision.exhausted_now:
                    _log.warning("token %r used up its query budget", token.name)
                    self._event("query-budget-exhausted", {**decision.detail, "client": client})
        response: web.StreamResponse = await handler(request)
        return response

    def _refused(
        self, client: str, status: int, reason: str, name: str | None, **headers: str
    ) -> web.Response:
        wait = self._lockouts.retry_after(client)
        if wait > 0:  # a locked-out loopback client (soft lockout): Retry-After, no more counting or events
            retry = str(math.ceil(wait))
            why = f"{reason}; too many failed authentications, retry in {retry} s"
            return self._count(_error(status, why, **headers, **{"Retry-After": retry}))
        seconds = self._lockouts.failure(client)
        data = {"client": client, "status": status, "reason": reason, "token_name": name}
        if seconds > 0:
            when = datetime.now(timezone.utc).isoformat(timespec="seconds")
            why = f"API client {client} locked out for {seconds:.0f} s"
            self._lockouts.last = {"time": when, "reason": why}
            _log.warning("API client %s locked out for %.0f s after repeated failed authentications",
                         client, seconds)
            self._event("api-lockout", {**data, "locked_s": seconds,
                                        "failures": self.config.abuse.lockout_failures})
        else:
            self._event("token-refused", data)
        return self._count(_error(status, reason, **headers))

    def _count(self, response: web.Response) -> web.Response:
        key = str(response.status) if response.status >= 400 else "ok"
        self.counts[key] = self.counts.get(key, 0) + 1
        return response

    # -- handlers --------------------------------------------------------------------------------------
    async def _infer(self, request: web.Request) -> web.Response:
        limit = self.config.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._count(
                _error(413, f"body of {request.content_length} bytes exceeds the limit of {limit}")
            )
        if not self.accepting:
            return self._count(_error(503, "stopping"))
        if self._in_flight >= self.config.max_in_flight:
            return self._count(_error(503, f"busy: {self._in_flight} requests in flight"))
        # Reserved before the body is read: what a request may still send is counted now, so a flood of big
        # bodies is answered 503 instead of being held in memory at once.
        reserve = request.content_length if request.content_length is not None else limit
        if self._bytes_in_flight + reserve > self.config.max_bytes_in_flight:
            busy = f"busy: {self._bytes_in_flight} bytes of request bodies in flight"
            return self._count(_error(503, busy))
        self._in_flight += 1
        self._bytes_in_flight += reserve
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._count(_error(413, f"body exceeds the limit of {limit} bytes"))
            loop = asyncio.get_running_loop()
            try:
                parsed = await loop.run_in_executor(
                    self._parser,
                    functools.partial(
                        parse_body,
                        body=body,
                        content_type=request.headers.get("Content-Type", ""),
                        specs=self._specs(),
                        source="api",
                        limits=self.config.limits,
                        input_name=request.query.get("input"),
                        correlation_id=request.query.get("id"),
                    ),
                )
            except UnsupportedMediaType as exc:
                return self._count(_error(415, str(exc)))
            except ServiceUnavailable as exc:  # no model to parse against (not serving)
                return self._count(_error(503, str(exc)))
            except InputRejected as exc:
                return self._count(_error(400, str(exc)))
            except MemoryError:  # the device is short of memory right now: refuse this one, keep serving
                return self._count(_error(503, "not enough memory to parse this body now"))
            try:
                result = await loop.run_in_executor(self._executor, self._sink, parsed)
            except AdversarialInput as exc:  # well-formed, but refused by the model's own defence
                return self._count(_error(422, str(exc)))
            except InputRejected as exc:
                return self._count(_error(400, str(exc)))
            except ServiceUnavailable as exc:
                return self._count(_error(503, str(exc)))
            except BackendError as exc:
                return self._count(_error(500, str(exc)))
            except OutboxError as exc:  # a result larger than outbox.max_payload_bytes: never acknowledged
                return self._count(_error(500, f"result not kept: {exc}"))
            except MemoryError:
                return self._count(_error(503, "not enough memory for this inference now"))
            except Exception:
                _log.exception("inference request failed")
                return self._count(_error(500, "internal error (see the device log)"))
            return self._count(web.json_response(result))
        finally:
            self._in_flight -= 1
            self._bytes_in_flight -= reserve

    async def _explain(self, request: web.Request) -> web.Response:
        """Like ``_infer``'s admission (size, capacity, bytes in flight), then one explanation on the
        inference threads; the body must be a PNG or JPEG photo."""
        if self._explainer is None or self.config.explain_max_passes == 0:
            return self._count(_error(404, "explanations are off here (sources.api.explain_max_passes = 0)"))
        kind = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind not in _IMAGE_TYPES:
            return self._count(_error(415, f"send a PNG or JPEG photo ({', '.join(_IMAGE_TYPES)})"))
        limit = self.config.limits.max_body_bytes
        reserve = request.content_length if request.content_length is not None else limit
        if reserve > limit:
            return self._count(_error(413, f"body of {reserve} bytes exceeds the limit of {limit}"))
        if not self.accepting:
            return self._count(_error(503, "stopping"))
        if self._in_flight >= self.config.max_in_flight or \
                self._bytes_in_flight + reserve > self.config.max_bytes_in_flight:
            return self._count(_error(503, f"busy: {self._in_flight} requests in flight"))
        self._in_flight += 1
        self._bytes_in_flight += reserve
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._count(_error(413, f"body exceeds the limit of {limit} bytes"))
            call = functools.partial(self._explainer, body, self.config.explain_max_passes)
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            except InputRejected as exc:
                return self._count(_error(400, str(exc)))
            except ServiceUnavailable as exc:
                return self._count(_error(503, str(exc)))
            except BackendError as exc:
                return self._count(_error(500, str(exc)))
            except MemoryError:
                return self._count(_error(503, "not enough memory for this explanation now"))
            except Exception:
                _log.exception("explanation failed")
                return self._count(_error(500, "internal error (see the device log)"))
            return self._count(web.json_response(result))
        finally:
            self._in_flight -= 1
            self._bytes_in_flight -= reserve

    async def _get_health(self, request: web.Request) -> web.Response:
        del request
        health = self._health()
        return self._count(web.json_response(health, status=200 if health.get("ok", True) else 503))

    async def _post_admin(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if self._admin is None:
            return self._count(_error(404, "no admin actions on this device"))
        try:
            raw = await request.read()
            args = json.loads(raw) if raw else {}
        except web.HTTPRequestEntityTooLarge:
            return self._count(_error(413, "body too large"))
        except (ValueError, UnicodeDecodeError) as exc:
            return self._count(_error(400, f"malformed JSON: {cut(exc)}"))
        if not isinstance(args, dict):
            return self._count(_error(400, "the JSON body must be an object"))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, self._admin, action, args)
        except KeyError:
            return self._count(_error(404, f"unknown admin action {echo(action)}"))
        except InputRejected as exc:
            return self._count(_error(400, str(exc)))
        except Exception as exc:
            _log.exception("admin action %s failed", echo(action))
            return self._count(_error(500, f"admin action {echo(action)} failed: {cut(exc)}"))
        return self._count(web.json_response(result))

    async def _openapi(self, request: web.Request) -> web.Response:
        del request
        return web.json_response(OPENAPI)


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _client_of(request: web.Request) -> str:
    """Who is asking, as far as the socket can tell: the TCP peer's address, or the Unix socket peer's uid
    (``SO_PEERCRED``: the kernel's word, not the client's). Local TCP clients all share 127.0.0.1."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            return f"uid:{uid}"
        except OSError:
            return "unix"
    return str(request.remote or "unknown")


def _required_scope(request: web.Request) -> str | None:
    path = request.path
    if path == "/v1/infer":
        return "infer"
    if path == "/v1/health":
        return "status"
    if path == "/v1/explain":
        return "explain"
    if path.startswith("/v1/admin/"):
        return "admin"
    return None  # the OpenAPI document and unknown routes (404) need no token
