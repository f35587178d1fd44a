"""`edgeguard init`, `token` and `status` on real files and a real service child process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeguard.service._state import SupervisorState, write_state
from tests.cli._run import eg, one_line_error
from tests.support.broker import free_port


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _secret(tokens: Path, name: str) -> str:
    for line in tokens.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name:
            return parts[2]
    raise AssertionError(f"no token {name} in {tokens}")


def _request(
    port: int, method: str, path: str, token: str, body: bytes | None = None, *, ctype: str = "text/plain"
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, yolov8n_path: Path) -> Path:
    del yolov8n_path  # fetched (cached) before init needs it
    root = tmp_path_factory.mktemp("init") / "mydevice"
    r = eg("init", root, "--port", free_port(), cwd=root.parent)
    assert r.code == 0, r
    assert "edgeguard run -c" in r.out and "edgeguard status -c" in r.out and "curl" in r.out
    app = _secret(root / "tokens", "app")
    assert f"Bearer {app}" in r.out  # the next command to type, with the token
    return root


def test_init_makes_private_files_and_a_config_that_checks(device: Path) -> None:
    assert _mode(device) == 0o700
    for private in ("tokens", "edgeguard.toml", "keys/device.key", "keys/publisher.key"):
        assert _mode(device / private) == 0o600, private
    text = (device / "edgeguard.toml").read_text()
    assert 'state_dir = "state"' in text and 'host = "127.0.0.1"' in text and "port = 1883" in text
    r = eg("run", "-c", device / "edgeguard.toml", "--check", cwd=device)
    assert r.code == 0, r
    r = eg("inspect", device / "model.egm", cwd=device)
    manifest = json.loads(r.out)["manifest"]
    assert manifest["name"] == "yolov8n" and manifest["golden_count"] == 1
    assert manifest["postprocess"]["labels"][1] == "FACE_FEMALE"


def test_init_refuses_a_non_empty_dir_unless_forced(device: Path, tmp_path: Path) -> None:
    one_line_error(eg("init", device, cwd=tmp_path), 2, "is not empty", "--force")
    (tmp_path / "f").write_text("x")
    one_line_error(eg("init", tmp_path / "f", cwd=tmp_path), 2, "not a directory")
    one_line_error(eg("init", tmp_path / "new", "--device-id", "a b", cwd=tmp_path), 2, "device.id")
    injected = 'x"\nfleet = "y'  # would add a key to the generated TOML if it were not checked first
    one_line_error(eg("init", tmp_path / "new", "--device-id", injected, cwd=tmp_path), 2, "device.id")
    assert not (tmp_path / "new").exists()  # refused before anything was written
    forced = tmp_path / "forced"
    forced.mkdir()
    (forced / "keep.txt").write_text("mine")
    (forced / "state" / "rollback").mkdir(parents=True)
    (forced / "state" / "rollback" / "ppocr-det").write_text("7")  # this device already served v7
    r = eg("init", forced, "--force", "--model", "ppocr-det", cwd=tmp_path)
    assert r.code == 0, r
    assert (forced / "keep.txt").read_text() == "mine"
    inspected = json.loads(eg("inspect", forced / "model.egm", cwd=tmp_path).out)
    assert inspected["manifest"]["name"] == "ppocr-det"
    assert inspected["manifest"]["version"] == 7  # at the floor, so the device accepts its fresh bundle


def test_token_add_list_revoke_keep_the_file_private_and_never_list_secrets(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    one_line_error(eg("token", "add", "cam", "--tokens", tokens, cwd=tmp_path), 2, "not found")
    r = eg("token", "add", "cam", "--tokens", tokens, "--create", "--scope", "infer,status", cwd=tmp_path)
    assert r.code == 0, r
    secret = r.out.strip().splitlines()[-1]
    assert len(secret) >= 32 and _secret(tokens, "cam") == secret and "SIGHUP" in r.err
    assert _mode(tokens) == 0o600
    r = eg("token", "add", "ops", "--tokens", tokens, "--scope", "admin", cwd=tmp_path)
    ops = r.out.strip().splitlines()[-1]
    listed = eg("token", "list", "--tokens", tokens, cwd=tmp_path)
    assert listed.code == 0 and "cam" in listed.out and "infer,status" in listed.out
    assert secret not in listed.out and ops not in listed.out
    rows = json.loads(eg("token", "list", "--tokens", tokens, "--json", cwd=tmp_path).out)
    assert [(r["name"], r["scopes"]) for r in rows] == [("cam", ["infer", "status"]), ("ops", ["admin"])]
    assert all(len(r["fingerprint"]) == 16 and r["fingerprint"] not in (secret, ops) for r in rows)
    one_line_error(eg("token", "add", "cam", "--tokens", tokens, cwd=tmp_path), 2, "exists")
    one_line_error(eg("token", "add", "x", "--scope", "root", "--tokens", tokens, cwd=tmp_path), 2, "--scope")
    r = eg("token", "revoke", "cam", "--tokens", tokens, cwd=tmp_path)
    assert r.code == 0 and "cam" not in tokens.read_text() and ops in tokens.read_text()
    assert _mode(tokens) == 0o600
    one_line_error(eg("token", "revoke", "cam", "--tokens", tokens, cwd=tmp_path), 2, "no token named 'cam'")
    # Refused, not rewritten: a file others can read, a symlink, a file the service would reject.
    tokens.chmod(0o640)
    one_line_error(eg("token", "list", "--tokens", tokens, cwd=tmp_path), 2, "chmod 600")
    tokens.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(tokens)
    one_line_error(eg("token", "add", "y", "--tokens", link, cwd=tmp_path), 2, str(link))
    tokens.write_text("short infer abc\n")
    tokens.chmod(0o600)
    one_line_error(eg("token", "add", "z", "--tokens", tokens, cwd=tmp_path), 2, "shorter than 16")
    assert tokens.read_text() == "short infer abc\n"


@pytest.fixture
def service(device: Path) -> Iterator[tuple[Path, int]]:
    config = device / "edgeguard.toml"
    # Nothing listens on this port: serving must not depend on a broker.
    dead_broker = free_port()
    config.write_text(config.read_text().replace("port = 1883", f"port = {dead_broker}"))
    port = int(next(line.split("=")[1] for line in config.read_text().splitlines()
                    if line.startswith("port =") and str(dead_broker) not in line))
    log = (device / "service.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "edgeguard", "run", "-c", str(config)],
                            stdout=log, stderr=log, start_new_session=True)
    try:
        yield device, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        config.write_text(config.read_text().replace(f"port = {dead_broker}", "port = 1883"))


def test_status_token_reload_against_the_running_service(
    service: tuple[Path, int], astronaut_png: Path
) -> None:
    device, port = service
    config = device / "edgeguard.toml"
    r = eg("status", "-c", config, "--wait", 90, cwd=device)
    assert r.code == 0, (r, (device / "service.log").read_text()[-2000:])
    first, *rest = r.out.splitlines()
    assert first.startswith("OK: serving yolov8n v1 on "), first
    body = "\n".join(rest)
    for what in ("fast path", "outbox     depth", "link       down", "restarts", "MTBF", "MTTR"):
        assert what in body, (what, body)
    doc = json.loads(eg("status", "-c", config, "--json", cwd=device).out)
    assert doc["ok"] is True and doc["source"] == "api" and doc["health"]["model"]["name"] == "yolov8n"

    # A token added (and revoked) with the CLI takes effect on `POST /v1/admin/reload`.
    ops = _secret(device / "tokens", "ops")
    cam = eg("token", "add", "cam", "-c", config, cwd=device).out.strip().splitlines()[-1]
    png = astronaut_png.read_bytes()
    assert _request(port, "POST", "/v1/infer", cam, png, ctype="image/png")[0] == 401  # not reloaded yet

    def reloaded(n: int) -> bool:
        return _request(port, "GET", "/v1/health", ops)[1]["pipeline"]["reloads"] >= n

    assert _request(port, "POST", "/v1/admin/reload", ops)[0] == 200
    deadline = time.monotonic() + 60
    while not reloaded(1):
        assert time.monotonic() < deadline, "reload did not finish"
        time.sleep(0.1)
    code, result = _request(port, "POST", "/v1/infer", cam, png, ctype="image/png")
    assert code == 200 and result["post"]["detections"][0]["label"] == "FACE_FEMALE", result
    assert eg("token", "revoke", "cam", "-c", config, cwd=device).code == 0
    assert _request(port, "POST", "/v1/admin/reload", ops)[0] == 200
    while not reloaded(2):
        assert time.monotonic() < deadline, "reload did not finish"
        time.sleep(0.1)
    assert _request(port, "POST", "/v1/infer", cam, png, ctype="image/png")[0] == 401

    # A tokens file the service does not serve: a config problem (2), not "not OK".
    other = device / "other-tokens"
    other.write_text("mon status mon-token-0123456789abcdef\n")
    other.chmod(0o600)
    one_line_error(eg("status", "-c", config, "--tokens", other, cwd=device), 2, "refused the status token")


def test_status_when_down_reads_the_state_files(device: Path, tmp_path: Path) -> None:
    config = device / "edgeguard.toml"
    r = eg("status", "-c", config, cwd=device)
    assert r.code == 1 and r.out.startswith("NOT OK: not running"), r
    state = device / "state" / "supervisor.json"
    saved = state.read_bytes() if state.exists() else None
    try:
        s = SupervisorState(starts=6, failures=5, up_s=50.0, safe_state=True,
                            safe_reason="crash loop: 5 failures in 300 s")
        s.record_failure(at=time.time(), reason="crash: exit code 70")
        state.parent.mkdir(exist_ok=True)
        write_state(state, s)
        r = eg("status", "-c", config, cwd=device)
        assert r.code == 1, r
        first = r.out.splitlines()[0]
        assert first.startswith("NOT OK: not running") and "SAFE STATE: crash loop" in first, first
        assert "crash: exit code 70" in r.out and "restarts   5" in r.out
        doc = json.loads(eg("status", "-c", config, "--json", cwd=device).out)
        assert doc["ok"] is False and doc["source"] == "state files" and doc["supervisor"]["safe_state"]
    finally:
        if saved is not None:
            state.write_bytes(saved)
    one_line_error(eg("status", "-c", tmp_path / "missing.toml", cwd=tmp_path), 2, "missing.toml")


def test_status_names_why_a_running_service_is_not_ok(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    port = free_port()
    assert eg("init", root, "--port", port, cwd=tmp_path).code == 0
    config = root / "edgeguard.toml"
    config.write_text(config.read_text().replace("port = 1883", f"port = {free_port()}"))
    bundle = bytearray((root / "model.egm").read_bytes())
    bundle[200] ^= 0x01  # inside the signed manifest: the device must refuse it and keep serving health
    (root / "model.egm").write_bytes(bytes(bundle))
    ops = _secret(root / "tokens", "ops")
    log = (root / "service.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "edgeguard", "run", "-c", str(config)],
                            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the API to answer at all (the worker runs without a model)
            try:
                if _request(port, "GET", "/v1/health", ops)[0] in (200, 503):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "service.log").read_text()
            time.sleep(0.1)
        r = eg("status", "-c", config, cwd=root)
        assert r.code == 1, r
        first = r.out.splitlines()[0]
        assert first.startswith("NOT OK: ") and "no-model" in first and "bundle rejected" in first, first
        assert "fast path  none (no model loaded)" in r.out, r.out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
