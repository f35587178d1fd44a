"""The dashboard's own parts: the rollout progress gatekeeper, the bounded live state, operator auth, and the
Server-Sent Events fan-out that drops a slow client instead of buffering for it. Real aiohttp server on a
loopback socket; FleetState fed the payloads the devices publish."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgeguard.errors import ConfigError
from edgeguard.fleet.dashboard import (
    COOKIE,
    DashboardServer,
    LiveFleet,
    RolloutBook,
    RolloutRejected,
    parse_rollout_unverified,
    read_token_file,
)
from edgeguard.fleet.dashboard._server import _Client
from edgeguard.fleet.view import FleetState

TOKEN = "t0ken-for-the-dashboard-tests-0123456789"
P = "edgeguard/v1/f1"

GOOD: dict[str, Any] = {
    "v": 1, "id": "r1", "model": "detector", "version": 4, "sha256": "ab" * 32, "group": "line-1",
    "state": "running", "max_failures": 1, "failures": 0, "started": 1000.0, "updated": 1010.0,
    "reason": None,
    "waves": [{"index": 0, "percent": 10, "devices": ["d1", "d2"], "state": "probation",
               "probation_until": 1070.0, "ok": ["d1"], "failed": {"d2": "error rate"},
               "rolled_back": ["d2"]}],
}


def _with(path: str, value: Any) -> bytes:
    doc = copy.deepcopy(GOOD)
    target: Any = doc
    *parents, last = path.split(".")
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return json.dumps(doc).encode()


def test_a_good_rollout_parses() -> None:
    r = parse_rollout_unverified("r1", json.dumps(GOOD).encode())
    assert r.id == "r1" and r.doc["waves"][0]["rolled_back"] == ["d2"] and r.doc["waves"][0]["failed"] == {
        "d2": "error rate"}


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"x" * (512 * 1024 + 1), "larger than"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (_with("v", 2), "format version"),
        (_with("id", "other"), "does not match the topic"),
        (_with("state", "exploded"), "unknown state"),
        (_with("version", "4"), "'version'"),
        (_with("version", True), "'version'"),
        (_with("failures", KeyError), "'failures'"),
        (_with("waves", {}), "waves"),
        (_with("waves", [{}] * 65), "waves"),
        (_with("waves.0.state", "lost"), "unknown state"),
        (_with("waves.0.percent", 101), "percent"),
        (_with("waves.0.devices", ["../etc"]), "not a device id"),
        (_with("waves.0.devices", ["d"] * 10_001), "at most"),
        (_with("waves.0.failed", {"d2": 7}), "device -> reason"),
        (_with("waves.0.rolled_back", "d2"), "list"),
    ],
)
def test_a_bad_rollout_is_one_typed_error(payload: bytes, why: str) -> None:
    with pytest.raises(RolloutRejected, match=why) as info:
        parse_rollout_unverified("r1", payload)
    assert "\n" not in str(info.value)


def test_rollout_book_keeps_the_last_good_state_and_stays_bounded() -> None:
    book = RolloutBook(capacity=2)
    assert book.take("f1", "r1", json.dumps(GOOD).encode())
    assert not book.take("f1", "r1", b"{broken")  # refused: the last good state stays
    assert book.rejected == 1 and book.all()[0]["state"] == "running"
    assert book.take("f1", "r2", json.dumps(GOOD | {"id": "r2", "state": "done", "updated": 1.0}).encode())
    # full, and r3 is new: the finished r2 makes room
    assert book.take("f1", "r3", json.dumps(GOOD | {"id": "r3"}).encode())
    assert sorted(r["id"] for r in book.all()) == ["r1", "r3"]
    # full of running rollouts: a fourth is refused, not stored
    assert not book.take("f1", "r4", json.dumps(GOOD | {"id": "r4"}).encode())
    assert len(book.all()) == 2 and book.rejected == 2
    assert book.take("f1", "r1", b"")  # an empty retained message removes it
    assert [r["id"] for r in book.all()] == ["r3"]


def _heartbeat(seq: int, depth: int = 0) -> bytes:
    return json.dumps({
        "model": {"name": "m", "version": 1}, "inferences": seq * 10, "uptime_s": float(seq),
        "latency_ms": {"p50": 2.0 + seq, "p99": 9.0}, "outbox": {"depth": depth}, "degraded": False,
    }).encode()


def _feed(live: LiveFleet, topic: str, payload: bytes, now: float) -> None:
    """What Follower does with one message (the view's own topics go to the state first)."""
    view_topic = topic.rsplit("/", 1)[1] in ("status", "heartbeat", "events") and "/rollouts/" not in topic
    event = live.state.ingest(topic, payload, now) if view_topic else None
    if event is not None:
        live.on_event(event)
    live.on_message(topic, payload, now, False)


def test_live_state_history_and_results_are_bounded_and_only_for_known_devices() -> None:
    clock = [1000.0]
    state = FleetState(max_devices=2)
    live = LiveFleet(state, history=5, results=3, result_bytes=64, wall=lambda: clock[0])
    for i in range(20):
        _feed(live, f"{P}/d1/heartbeat", _heartbeat(i, depth=i), 1000.0 + i)
        _feed(live, f"{P}/d1/results", json.dumps({"id": f"d1:{i}", "data": {"y": "x" * 100}}).encode(),
              1000.0 + i)
    for dev in ("d2", "d3"):  # d3 is beyond max_devices: nothing stored for it
        _feed(live, f"{P}/{dev}/heartbeat", _heartbeat(1), 1000.0)
        _feed(live, f"{P}/{dev}/results", b'{"id":"r"}', 1000.0)
    clock[0] = 1020.0
    detail = live.detail("f1", "d1")
    assert detail is not None
    assert detail["device"]["history"]["outbox"] == [15, 16, 17, 18, 19]
    assert [r["id"] for r in detail["results"]] == ["d1:19", "d1:18", "d1:17"]
    assert all(r["cut"] and len(r["text"]) == 64 for r in detail["results"])
    assert live.detail("f1", "d3") is None and state.devices_refused >= 1
    snap = live.snapshot()
    assert {d["device"] for d in snap["devices"]} == {"d1", "d2"}
    _feed(live, f"{P}/rollouts/r1", json.dumps(GOOD).encode(), 1020.0)
    assert live.snapshot()["rollouts"][0]["id"] == "r1"


def test_changes_carry_only_what_changed_and_problems_that_come_with_time() -> None:
    clock = [1000.0]
    state = FleetState(stale_after_s=30)
    live = LiveFleet(state, wall=lambda: clock[0])
    for dev in ("a", "b"):
        _feed(live, f"{P}/{dev}/status", b'{"state":"online"}', 1000.0)
        _feed(live, f"{P}/{dev}/heartbeat", _heartbeat(1), 1000.0)
    first = live.changes()
    assert first is not None and {d["device"] for d in first["devices"]} == {"a", "b"}
    assert live.changes() is None  # nothing new
    _feed(live, f"{P}/a/status", b'{"state":"offline"}', 1001.0)
    update = live.changes()
    assert update is not None
    assert [(d["device"], d["status"]) for d in update["devices"]] == [("a", "offline")]
    assert [e["kind"] for e in update["events"]] == ["offline"]
    clock[0] = 1100.0  # b is silent for 100 s: stale, without any message
    later = live.changes()
    assert later is not None and [(d["device"], d["status"]) for d in later["devices"]] == [("b", "degraded")]


def _member_beat(share: str, served: int, reason: str | None = None, streams: Any = None) -> bytes:
    site = {"group": "line-1", "share": share, "reason": reason, "served": served, "redelivered": 1,
            "streams": streams or {}}
    return json.dumps({"state": "serving", "sources": {"group": site}}).encode()


def test_groups_come_with_the_snapshot_and_with_an_update_only_when_they_changed() -> None:
    clock = [1000.0]
    live = LiveFleet(FleetState(), wall=lambda: clock[0])
    cam = {"cam-1": {"holder": "a", "fencing_token": 3, "takeovers": 1}}
    _feed(live, f"{P}/a/heartbeat", _member_beat("joined", 30, streams=cam), 1000.0)
    _feed(live, f"{P}/b/heartbeat", _member_beat("joined", 10), 1000.0)
    _feed(live, f"{P}/c/heartbeat", _heartbeat(1), 1000.0)  # in no group
    [g] = live.snapshot()["groups"]
    assert g["members"] == ["a", "b"] and g["joined"] == ["a", "b"] and g["load"] == {"a": 0.75, "b": 0.25}
    assert g["redelivered"] == 2 and g["failovers"] == 1
    assert g["streams"] == {"cam-1": {"holder": "a", "fencing_token": 3}}
    first = live.changes()
    assert first is not None and first["groups"] == [g]
    _feed(live, f"{P}/c/heartbeat", _heartbeat(2), 1001.0)  # a change that leaves the groups alone
    update = live.changes()
    assert update is not None and "groups" not in update
    _feed(live, f"{P}/b/heartbeat", _member_beat("left", 10, reason="no model"), 1002.0)
    update = live.changes()
    assert update is not None and update["groups"][0]["left"] == {"b": "no model"}
    assert update["groups"][0]["joined"] == ["a"]


def test_token_file_must_be_private_long_and_plain(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):
        read_token_file(path)
    for bad in ("short", "has space inside the token 123", "x" * 600):
        path.write_text(bad)
        path.chmod(0o600)
        with pytest.raises(ConfigError, match="token file"):
            read_token_file(path)
    link = tmp_path / "link"
    os.symlink(path, link)
    with pytest.raises(ConfigError):
        read_token_file(link)


async def _serve(server: DashboardServer) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def test_every_route_needs_the_token_or_the_session_cookie() -> None:
    state = FleetState()
    state.ingest(f"{P}/d1/heartbeat", _heartbeat(1), 1000.0)
    server = DashboardServer(LiveFleet(state), token=TOKEN, fleet="f1")

    async def go() -> None:
        runner, url = await _serve(server)
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                for path in ("/", "/api/state", "/api/events", "/static/dashboard.js", "/api/device/f1/d1"):
                    async with s.get(url + path) as r:
                        assert r.status == 401, path
                    async with s.get(url + path, headers={"Authorization": "Bearer wrong-token"}) as r:
                        assert r.status == 401, path
                async with s.get(url + "/", headers={"Accept": "text/html"}) as r:
                    assert r.status == 401 and 'name="token"' in await r.text()  # the sign-in form
                async with s.post(url + "/api/action", json={}) as r:
                    assert r.status == 401
                async with s.post(url + "/login", data={"token": "nope"}, allow_redirects=False) as r:
                    assert r.status == 401 and COOKIE not in r.cookies
                async with s.get(url + "/api/state", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 200 and (await r.json())["devices"][0]["device"] == "d1"
                async with s.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
                    assert r.status == 303
                    cookie = r.cookies[COOKIE]
                    assert cookie["httponly"] and cookie["samesite"] == "Strict"
                async with s.get(url + "/api/device/f1/d1") as r:  # the session cookie now
                    assert r.status == 200
                async with s.get(url + "/static/../../etc/passwd") as r:
                    assert r.status == 404
                # with the cookie, a POST without the header a cross-site form cannot add is refused
                ping = {"fleet": "f1", "device": "d1", "action": "ping"}
                async with s.post(url + "/api/action", json=ping) as r:
                    assert r.status == 403
                async with s.post(url + "/api/action", json={}, headers={"X-EdgeGuard": "1"}) as r:
                    assert r.status == 403 and "sign-key" in (await r.json())["error"]  # no key: no actions
                async with s.get(url + "/") as r:
                    page = await r.text()
                    assert r.status == 200 and 'data-actions="off"' in page
                    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        finally:
            await runner.cleanup()

    asyncio.run(go())


def test_a_slow_client_is_dropped_and_its_queue_never_grows() -> None:
    state = FleetState()
    server = DashboardServer(LiveFleet(state), token=TOKEN, fleet="f1", client_queue=4)

    async def go() -> None:
        async def never_reads() -> None:
            await asyncio.sleep(3600)

        slow = _Client(asyncio.Queue(maxsize=server.client_queue))
        slow.task = asyncio.get_running_loop().create_task(never_reads())
        fast = _Client(asyncio.Queue(maxsize=server.client_queue))
        server._clients |= {slow, fast}
        for i in range(10):
            server._broadcast(b"data: %d\n\n" % i)
            assert slow.queue.qsize() <= server.client_queue
            while not fast.queue.empty():  # the fast one keeps up
                fast.queue.get_nowait()
        assert server.clients_dropped == 1 and server._clients == {fast}
        await asyncio.sleep(0)
        assert slow.task.cancelled()

    asyncio.run(go())


def test_a_slow_reader_over_a_real_socket_is_disconnected() -> None:
    """A page that stops reading: once the socket buffers are full its queue fills and it is dropped."""
    state = FleetState()
    server = DashboardServer(LiveFleet(state), token=TOKEN, fleet="f1", client_queue=2)

    async def go() -> None:
        runner, url = await _serve(server)
        host, port = url.removeprefix("http://").split(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.transport.set_write_buffer_limits(0)
            request = f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the headers; then never another byte read
            big = b"data: " + b"x" * 1_000_000 + b"\n\n"
            deadline = asyncio.get_running_loop().time() + 120
            while server.clients_dropped == 0:
                assert asyncio.get_running_loop().time() < deadline, "the slow client was never dropped"
                server._broadcast(big)
                assert all(c.queue.qsize() <= 2 for c in server._clients)
                await asyncio.sleep(0.01)
            assert not server._clients
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(go())


def test_the_command_refuses_bad_options_in_one_line_before_serving(tmp_path: Path, capsys: Any) -> None:
    from edgeguard.cli import main

    open_token = tmp_path / "open.token"
    open_token.write_text(TOKEN)
    open_token.chmod(0o644)
    good = tmp_path / "good.token"
    good.write_text(TOKEN)
    good.chmod(0o600)
    cases = [
        (["--token-file", str(open_token)], "too open"),
        (["--token-file", str(tmp_path / "missing")], "token file"),
        (["--token-file", str(good), "--listen", "nowhere"], "--listen"),
        (["--token-file", str(good), "--history", "0"], "--history"),
        (["--token-file", str(good), "--broker", "127.0.0.1:1"], "cannot connect"),
    ]
    for extra, why in cases:
        code = main(["fleet", "dashboard", "--fleet", "f1", *extra])
        err = capsys.readouterr().err.strip()
        assert code != 0 and why in err and len(err.splitlines()) == 1, (extra, err)


def _answering(broker: Any, device: str, key: Any, *, claim: str | None = None) -> Any:
    """An MQTT client on ``device``'s cmd topic answering every command with an envelope signed by ``key``
    (the device's own key: a genuine answer; any other: a forgery)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeguard.commands import ANSWER_LABEL, envelope

    base = f"edgeguard/v1/f1/{device}/"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        cmd = json.loads(base64.b64decode(json.loads(msg.payload)["payload"]))
        doc = {"v": 1, "device": claim or device, "fleet": "f1", "time": int(cmd["issued_at"]),
               "nonce": cmd["nonce"], "name": cmd["name"], "ok": True, "result": {"pong": True}}
        c.publish(base + "cmd/resp", envelope(doc, key, ANSWER_LABEL), qos=1)

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(base + "cmd", 1)
    client.loop_start()
    assert subscribed.wait(20)
    return client


def test_actions_show_verified_and_forged_answers(mosquitto: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeguard.fleet.dashboard import Actions
    from edgeguard.link import LinkConfig

    operator, genuine, impostor = (Ed25519PrivateKey.generate() for _ in range(3))
    actions = Actions(key=operator, broker=LinkConfig(host=mosquitto.host, port=mosquitto.port),
                      pinned={"d1": genuine.public_key(), "d2": genuine.public_key()}, timeout_s=3.0)
    clients = [_answering(mosquitto, "d1", genuine), _answering(mosquitto, "d2", impostor)]
    try:
        good = actions.run("f1", "d1", "ping")
        assert good["verdict"] == "verified" and good["ok"] and good["result"] == {"pong": True}
        forged = actions.run("f1", "d2", "ping")
        assert forged["verdict"] == "forged" and not forged["ok"] and "forged" in forged["why"]
        assert any("not d2's" in why for why in forged["forged"])
        with pytest.raises(ValueError, match="unknown action"):
            actions.run("f1", "d1", "restart")
    finally:
        actions.close()
        for c in clients:
            c.loop_stop()
            c.disconnect()


def test_the_page_ships_as_package_data_and_every_shipped_file_is_served() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from edgeguard.fleet.dashboard import _server

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "fleet/dashboard/static/*" in data["edgeguard"]
    static = root / "edgeguard/fleet/dashboard/static"
    served = {*_server._STATIC, "index.html", "login.html"}
    assert {p.name for p in static.iterdir()} == served
    page = (static / "index.html").read_text()
    # no CDN, no inline script: every script and style the page loads is one of its own files
    assert "http" not in page.replace("http-equiv", "") and "<script>" not in page
    for ref in ("/static/dashboard.js", "/static/detail.js", "/static/dashboard.css"):
        assert ref in page
