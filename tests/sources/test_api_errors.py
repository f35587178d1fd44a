"""Every error the local API answers is the documented JSON body, also those aiohttp's router makes itself
(unknown path 404, wrong method 405): a client never has to parse plain text."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.sources.test_api import INFER, STATUS, Server, server

__all__ = ["server"]


def _raw(srv: Server, method: str, path: str, token: str | None = INFER) -> tuple[int, str, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.api.port, timeout=20)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    ctype, allow = resp.getheader("Content-Type", ""), resp.getheader("Allow", "")
    conn.close()
    return resp.status, ctype, data, allow


@pytest.mark.parametrize(
    ("method", "path", "status", "token"),
    [
        ("GET", "/nope", 404, None),
        ("GET", "/v1/nope", 404, INFER),
        ("POST", "/v1/health/x", 404, STATUS),
        ("GET", "/v1/infer", 405, INFER),
        ("DELETE", "/v1/health", 405, STATUS),
        ("PUT", "/v1/openapi.json", 405, None),
    ],
)
def test_router_errors_are_json(
    server: Server, method: str, path: str, status: int, token: str | None
) -> None:
    code, ctype, data, allow = _raw(server, method, path, token)
    assert code == status
    assert ctype.startswith("application/json"), (ctype, data)
    doc = json.loads(data)
    assert doc["status"] == status and isinstance(doc["error"], str) and doc["error"], doc
    assert set(doc) == {"error", "status"}
    if status == 405:
        assert allow, "a 405 keeps its Allow header"
        assert method in doc["error"] and allow in doc["error"], doc
    assert server.api.counts.get(str(status), 0) >= 1  # counted like every other refusal
    # and the API keeps serving
    code, ctype, data, _ = _raw(server, "GET", "/v1/health", STATUS)
    assert code == 200 and json.loads(data)["ok"] is True
