"""The local API over real sockets (loopback TCP and a Unix socket): every auth and bad-input case."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeguard.errors import BackendError, InputRejected
from edgeguard.sources import OPENAPI, ApiConfig, ApiSource, BodyLimits, InferenceRequest, TokenStore
from tests.sources.conftest import SPECS, RecordingSink

INFER = "app-token-0123456789abcdef"
STATUS = "mon-token-0123456789abcdef"
ADMIN = "ops-token-0123456789abcdef"


class Server:
    def __init__(self, api: ApiSource) -> None:
        self.api = api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(api.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def _tokens(tmp_path: Path) -> TokenStore:
    p = tmp_path / "tokens"
    p.write_text(f"app infer {INFER}\nmon status {STATUS}\nops admin,status {ADMIN}\n")
    p.chmod(0o600)
    return TokenStore.from_file(p)


@pytest.fixture
def server(tmp_path: Path, sink: RecordingSink) -> Iterator[Server]:
    admin_calls: list[str] = []

    def admin(action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action != "reload":
            raise KeyError(action)
        admin_calls.append(action)
        return {"reloaded": True}

    cfg = ApiConfig(
        unix_socket=tmp_path / "api.sock",
        host="127.0.0.1",
        port=0,
        limits=BodyLimits(max_body_bytes=64 * 1024),
        max_in_flight=64,
    )
    api = ApiSource(
        config=cfg,
        tokens=_tokens(tmp_path),
        sink=sink,
        specs=lambda: SPECS,
        health=lambda: {"ok": True, "model": "test"},
        admin=admin,
    )
    srv = Server(api)
    yield srv
    srv.stop()


def _req(
    srv: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = INFER,
    ctype: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.api.port, timeout=20)
    h = {"Content-Type": ctype, **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


GOOD = json.dumps({"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}, "id": "c-1"}).encode()


def test_infer_ok_over_tcp_and_unix_socket(server: Server, sink: RecordingSink, tmp_path: Path) -> None:
    status, body = _req(server, "POST", "/v1/infer", GOOD)
    assert status == 200 and body["id"] == "dev-1" and body["correlation_id"] == "c-1"
    conn = UnixHTTPConnection(str(tmp_path / "api.sock"))
    conn.request(
        "POST",
        "/v1/infer",
        body=GOOD,
        headers={"Authorization": f"Bearer {INFER}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["id"] == "dev-2"
    assert (tmp_path / "api.sock").stat().st_mode & 0o777 == 0o660


def test_npy_body(server: Server, sink: RecordingSink) -> None:
    buf = io.BytesIO()
    np.save(buf, np.full((1, 4), 0.5, np.float32))
    status, body = _req(server, "POST", "/v1/infer?id=npy-1", buf.getvalue(), ctype="application/x-npy")
    assert status == 200 and body["correlation_id"] == "npy-1"
    assert sink.requests[-1].tensors is not None


CASES = [
    # (method, path, body, token, ctype, status, reason fragment)
    ("POST", "/v1/infer", GOOD, None, "application/json", 401, "missing bearer token"),
    ("POST", "/v1/infer", GOOD, "wrong-token-0123456789abc", "application/json", 401, "invalid token"),
    ("POST", "/v1/infer", GOOD, STATUS, "application/json", 403, "lacks the 'infer' scope"),
    ("GET", "/v1/health", None, INFER, "application/json", 403, "lacks the 'status' scope"),
    ("POST", "/v1/admin/reload", b"{}", STATUS, "application/json", 403, "lacks the 'admin' scope"),
    ("POST", "/v1/infer", b"x" * (70 * 1024), INFER, "application/json", 413, "exceeds the limit"),
    ("POST", "/v1/infer", b"{oops", INFER, "application/json", 400, "malformed JSON"),
    (
        "POST",
        "/v1/infer",
        b'{"inputs": {"x": [[1, 2, 3]]}}',
        INFER,
        "application/json",
        400,
        "expected [1, 4]",
    ),
    ("POST", "/v1/infer", b'{"inputs": {"x": [[1, 2, 3, 9]]}}', INFER, "application/json", 400, "above 1.0"),
    ("POST", "/v1/infer", b"a,b,c", INFER, "text/csv", 415, "unsupported content type"),
    ("POST", "/v1/admin/explode", b"{}", ADMIN, "application/json", 404, "unknown admin action"),
    ("POST", "/v1/admin/reload", b"[1]", ADMIN, "application/json", 400, "must be an object"),
]


@pytest.mark.parametrize(("method", "path", "body", "token", "ctype", "status", "reason"), CASES)
def test_refusals_keep_serving(  # noqa: PLR0917 - one parameter per table column
    server: Server,
    sink: RecordingSink,
    method: str,
    path: str,
    body: bytes | None,
    token: str | None,
    ctype: str,
    status: int,
    reason: str,
) -> None:
    got, doc = _req(server, method, path, body, token=token, ctype=ctype)
    assert got == status
    assert reason in doc["error"] and "\n" not in doc["error"]
    assert not sink.requests  # nothing refused reached the engine
    assert _req(server, "POST", "/v1/infer", GOOD)[0] == 200  # and the service is alive after


def test_chunked_oversize_without_content_length(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.api.port, timeout=20)
    conn.request(
        "POST",
        "/v1/infer",
        body=iter([b"x" * 40000, b"y" * 40000]),
        encode_chunked=True,
        headers={
            "Authorization": f"Bearer {INFER}",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 413
    assert _req(server, "POST", "/v1/infer", GOOD)[0] == 200


def test_health_admin_openapi(server: Server) -> None:
    assert _req(server, "GET", "/v1/health", token=STATUS) == (200, {"ok": True, "model": "test"})
    assert _req(server, "POST", "/v1/admin/reload", b"", token=ADMIN) == (200, {"reloaded": True})
    status, doc = _req(server, "GET", "/v1/openapi.json", token=None)
    assert status == 200 and doc == json.loads(json.dumps(OPENAPI))


def test_openapi_document_in_repo_is_current() -> None:
    repo = json.loads((Path(__file__).parents[2] / "docs/openapi.json").read_text())
    assert repo == json.loads(json.dumps(OPENAPI))


def test_engine_errors_map_to_status(tmp_path: Path) -> None:
    def failing(request: InferenceRequest) -> dict[str, Any]:
        raise (
            BackendError("onnxruntime: run failed")
            if request.correlation_id == "b"
            else InputRejected("nope")
        )

    cfg = ApiConfig(host="127.0.0.1", port=0)
    srv = Server(
        ApiSource(
            config=cfg,
            tokens=_tokens(tmp_path),
            sink=failing,
            specs=lambda: SPECS,
            health=lambda: {"ok": False},
        )
    )
    try:
        body_b = json.dumps({"inputs": {"x": [[0, 0, 0, 0]]}, "id": "b"}).encode()
        assert _req(srv, "POST", "/v1/infer", body_b) == (
            500,
            {"error": "onnxruntime: run failed", "status": 500},
        )
        assert _req(srv, "POST", "/v1/infer", GOOD)[0] == 400
        assert _req(srv, "GET", "/v1/health", token=STATUS)[0] == 503
    finally:
        srv.stop()


def test_many_concurrent_clients(server: Server, sink: RecordingSink) -> None:
    sink.delay = 0.01

    def one(i: int) -> int:
        good = json.dumps({"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}, "id": f"c{i}"}).encode()
        if i % 5 == 0:
            return _req(server, "POST", "/v1/infer", good, token="bad-token-0123456789abcd")[0]
        return _req(server, "POST", "/v1/infer", good)[0]

    with ThreadPoolExecutor(max_workers=24) as pool:
        codes = list(pool.map(one, range(120)))
    assert codes.count(401) == 24 and codes.count(200) == 96
    ids = {r.correlation_id for r in sink.requests}
    assert len(ids) == 96  # each accepted request reached the engine exactly once
    assert server.api.snapshot()["in_flight"] == 0


def test_non_loopback_host_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        ApiConfig(host="0.0.0.0")
    assert ApiConfig(host="0.0.0.0", allow_non_loopback=True).host == "0.0.0.0"
    assert ApiConfig(host="::1").host == "::1"


def test_busy_is_503_not_an_unbounded_queue(tmp_path: Path, sink: RecordingSink) -> None:
    sink.delay = 0.5
    cfg = ApiConfig(host="127.0.0.1", port=0, max_in_flight=2, infer_threads=2)
    srv = Server(
        ApiSource(
            config=cfg, tokens=_tokens(tmp_path), sink=sink, specs=lambda: SPECS, health=lambda: {"ok": True}
        )
    )
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(pool.map(lambda i: _req(srv, "POST", "/v1/infer", GOOD)[0], range(6)))
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
        assert srv.api.counts["503"] == codes.count(503)
        sink.delay = 0.0
        assert _req(srv, "POST", "/v1/infer", GOOD)[0] == 200
    finally:
        srv.stop()


def test_bytes_in_flight_are_bounded_before_bodies_are_read(tmp_path: Path, sink: RecordingSink) -> None:
    """Two 40 KiB bodies fill 96 KiB of body bytes: a third is 503 whatever its count, and so is a chunked
    upload (it reserves max_body_bytes, since it may send that much); released when the requests end."""
    release = threading.Event()

    def held(request: InferenceRequest) -> dict[str, Any]:
        release.wait(20)
        return sink(request)

    cfg = ApiConfig(host="127.0.0.1", port=0, limits=BodyLimits(max_body_bytes=64 * 1024),
                    max_bytes_in_flight=96 * 1024, max_in_flight=64)
    srv = Server(ApiSource(config=cfg, tokens=_tokens(tmp_path), sink=held, specs=lambda: SPECS,
                           health=lambda: {"ok": True}))
    padded = GOOD[:-1] + b" " * (40 * 1024) + b"}"
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            admitted = [pool.submit(_req, srv, "POST", "/v1/infer", padded) for _ in range(2)]
            end = time.monotonic() + 10
            while srv.api.snapshot()["bytes_in_flight"] < 2 * len(padded) and time.monotonic() < end:
                threading.Event().wait(0.01)  # polling a counter the server exposes; bounded by `end`
            assert srv.api.snapshot()["bytes_in_flight"] == 2 * len(padded)
            code, doc = _req(srv, "POST", "/v1/infer", padded)
            assert code == 503
            assert doc["error"] == f"busy: {2 * len(padded)} bytes of request bodies in flight"
            conn = http.client.HTTPConnection("127.0.0.1", srv.api.port, timeout=20)
            conn.request("POST", "/v1/infer", body=iter([GOOD]), encode_chunked=True,
                         headers={"Authorization": f"Bearer {INFER}", "Transfer-Encoding": "chunked"})
            assert conn.getresponse().status == 503
            conn.close()
            release.set()
            assert [f.result()[0] for f in admitted] == [200, 200]
        assert srv.api.snapshot()["bytes_in_flight"] == 0
        assert _req(srv, "POST", "/v1/infer", GOOD)[0] == 200
    finally:
        release.set()
        srv.stop()


def test_bytes_in_flight_must_hold_one_body() -> None:
    with pytest.raises(ValueError, match="max_bytes_in_flight"):
        ApiConfig(limits=BodyLimits(max_body_bytes=1 << 20), max_bytes_in_flight=1 << 19)
