"""Attacks on the files the service reads, the secrets it holds and the text it echoes (issue 8, items 9-14).

Most cases run against one real service (`edgeguard run`: supervisor and worker as child processes, a real
mosquitto, the local API over real sockets) that the attacker prepared the ground for before it started: a
symbolic link planted at the API socket's path, a world-writable hook and one owned by nobody, a token with a
``#`` in it, systemd's credentials directory in the service's environment. The file-reading cases that need
an exact interleaving (a file swapped between the directory scan and the read) drive the real directory
source with real files, FIFOs and ``/dev/zero``; the validators are checked one class at a time.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeguard._echo import ECHO_MAX_CHARS, cut, echo
from edgeguard.errors import BundleRejected, ConfigError, KeyFileError
from edgeguard.keys import generate_keypair, load_device_key, load_trusted_key, read_revocation_list
from edgeguard.sources import DirectoryConfig, DirectorySource, InferenceRequest, TokenStore
from tests.service._env import ADMIN, INFER, STATUS, Device, tiny_bundle
from tests.sources.conftest import SPECS, RecordingSink
from tests.support.broker import MosquittoBroker, Recorder

HASH_TOKEN = "hash-token-0123456789#abcdefghij"  # its 21-character prefix before '#' must not be a token
GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
INPUT_TOPIC = "edgeguard/v1/test/dev-1/input"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
MAX_REASON = 1024  # an echoed reason, whatever it quotes, stays well under this


# --------------------------------------------------------------------------------------- the real service
class Attacked:
    def __init__(self, dev: Device, rec: Recorder) -> None:
        self.dev = dev
        self.rec = rec
        self.root = dev.root

    def post(self, body: bytes, *, token: str | None = INFER, path: str = "/v1/infer") -> tuple[int, Any]:
        return self.dev.request("POST", path, body, token=token)

    def health(self) -> dict[str, Any]:
        code, doc = self.dev.request("GET", "/v1/health", token=STATUS)
        assert code in (200, 503), doc
        assert isinstance(doc, dict)
        return doc


def _write_hook(path: Path, body: str, mode: int = 0o755) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    root = tmp_path_factory.mktemp("attacked")
    broker = MosquittoBroker(root)
    dev = Device(root=root, broker=broker)
    dev.provision(tiny_bundle(root), directory=True)
    tokens = root / "tokens"
    tokens.write_text(
        f"app infer {INFER}\nmon status {STATUS}\nops admin,status,infer {ADMIN}  # operator\n"
        f"hashed infer {HASH_TOKEN}\n"
    )
    tokens.chmod(0o600)
    # The socket path holds a link to a private file: a chmod after bind would make that file 0660.
    victim = root / "victim"
    victim.write_text("private\n")
    victim.chmod(0o600)
    (root / "api.sock").symlink_to(victim)
    hooks = root / "hooks"
    _write_hook(hooks / "10-env", f"env > {root / 'hook.env'}")
    _write_hook(hooks / "20-world-writable", f"echo ran >> {root / 'evil-world'}", 0o777)
    if IS_ROOT:  # only root can give a file away; as another user the world-writable case still runs
        _write_hook(hooks / "30-nobody", f"echo ran >> {root / 'evil-nobody'}")
        os.chown(hooks / "30-nobody", NOBODY, NOBODY)
    (root / "incoming").mkdir()
    creds = root / "creds"
    creds.mkdir(mode=0o700)
    (creds / "api-tokens").write_text("secret\n")
    rec = Recorder(broker)
    dev.start(env={"CREDENTIALS_DIRECTORY": str(creds), "EDGEGUARD_LED": "led7"})
    try:
        dev.wait_ready()
        yield Attacked(dev, rec)
    finally:
        dev.stop()
        rec.close()
        broker.kill()


def test_token_with_hash_is_checked_whole(svc: Attacked) -> None:
    prefix = HASH_TOKEN.split("#", 1)[0]
    assert len(prefix) >= 16  # the old parser accepted exactly this prefix as a token
    code, doc = svc.post(GOOD, token=prefix)
    assert code == 401, doc
    code, doc = svc.post(GOOD, token=HASH_TOKEN)
    assert code == 200, doc
    code, doc = svc.post(GOOD, token=ADMIN)  # a comment after a token still works
    assert code == 200, doc


def test_unknown_key_echo_is_cut_and_service_keeps_serving(svc: Attacked) -> None:
    huge_key = "A" * (3 * 1024 * 1024)
    code, doc = svc.post(json.dumps({huge_key: 1}).encode())
    assert code == 400
    assert doc["error"].startswith("unknown key 'AAAA") and "more cut" in doc["error"]
    assert len(json.dumps(doc)) < MAX_REASON
    code, doc = svc.post(json.dumps({"inputs": {"x": ["B" * 100_000]}}).encode())  # numpy quotes its input
    assert code == 400 and len(json.dumps(doc)) < MAX_REASON, len(json.dumps(doc))
    assert svc.post(GOOD)[0] == 200
    assert max(len(line) for line in (svc.root / "service.log").read_bytes().splitlines()) < 4096


def test_mqtt_bad_message_event_and_log_line_are_cut(svc: Attacked) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
    pub.connect(svc.dev.broker.host, svc.dev.broker.port)
    pub.loop_start()
    try:
        payload = json.dumps({"K" * (900 * 1024): 1}).encode()  # under the input limit (1 MiB)
        pub.publish(INPUT_TOPIC, payload, qos=1).wait_for_publish(10)
        assert svc.rec.wait_for(
            lambda msgs: any(t.endswith("/events") and b"input-rejected" in p for t, p in msgs), 30
        ), "no input-rejected event"
    finally:
        pub.loop_stop()
        pub.disconnect()
    events = [p for p in svc.rec.on_topic("/events") if b"input-rejected" in p]
    assert events and all(len(p) < MAX_REASON + 512 for p in events), [len(p) for p in events]
    assert b"more cut" in events[-1]
    svc.dev.wait(lambda: b"mqtt input rejected" in (svc.root / "service.log").read_bytes(), 10, "log line")
    assert max(len(line) for line in (svc.root / "service.log").read_bytes().splitlines()) < 4096
    assert svc.post(GOOD)[0] == 200


def test_socket_link_is_replaced_not_followed(svc: Attacked) -> None:
    sock = svc.root / "api.sock"
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE((svc.root / "victim").stat().st_mode) == 0o600
    assert (svc.root / "victim").read_text() == "private\n"
    assert not [p for p in svc.root.iterdir() if p.name.startswith(".eg")]  # no staging directory left
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(str(sock))
        c.sendall(b"GET /v1/openapi.json HTTP/1.0\r\n\r\n")
        assert c.recv(12).startswith(b"HTTP/1.")


def test_socket_swapped_for_a_link_while_starting_never_touches_the_target(tmp_path: Path) -> None:
    """An attacker who can write the socket's directory keeps replacing the socket path with a link to a
    private file while the API starts and stops; the file's mode must never change (a chmod after bind
    followed such a link) and every start must succeed."""
    import asyncio

    from edgeguard.sources import ApiConfig, ApiSource

    victim = tmp_path / "victim"
    victim.write_text("private\n")
    victim.chmod(0o600)
    path = tmp_path / "api.sock"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"app infer {INFER}\n")
    tokens.chmod(0o600)
    store = TokenStore.from_file(tokens)
    halt = threading.Event()

    def attacker() -> None:
        i = 0
        while not halt.is_set():
            tmp = tmp_path / f".l{i % 2}"
            i += 1
            try:
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(victim)
                os.replace(tmp, path)
            except OSError:
                pass

    async def cycles(n: int) -> int:
        failed = 0
        for _ in range(n):
            api = ApiSource(
                config=ApiConfig(unix_socket=path, host=None),
                tokens=store,
                sink=RecordingSink(),
                specs=lambda: SPECS,
                health=dict,
            )
            try:
                await api.start()
            except OSError:
                failed += 1
            await api.stop()
        return failed

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the attacker with every step of the start
    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        failed = asyncio.run(cycles(200))
    finally:
        halt.set()
        thread.join(10)
        sys.setswitchinterval(old_interval)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == "private\n"
    assert failed == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eg")]


def test_hooks_unsafe_refused_and_minimal_environment(svc: Attacked) -> None:
    log = svc.root / "hooks.log"
    code, doc = svc.post(b"{}", token=ADMIN, path="/v1/admin/reload")
    assert code == 200, doc
    svc.dev.wait(lambda: log.exists() and b'"reloaded"' in log.read_bytes(), 60, "the reloaded hook")
    assert not (svc.root / "evil-world").exists()
    assert not (svc.root / "evil-nobody").exists()
    env = dict(line.split("=", 1) for line in (svc.root / "hook.env").read_text().splitlines() if "=" in line)
    assert "CREDENTIALS_DIRECTORY" not in env and "NOTIFY_SOCKET" not in env, env
    assert not [k for k in env if k.startswith("WATCHDOG")], env
    assert env["EDGEGUARD_LED"] == "led7" and env["EDGEGUARD_DEVICE"] == "dev-1"
    assert env["EDGEGUARD_EVENT"] in ("reloaded", "recovered", "degraded")
    text = (svc.root / "service.log").read_text()
    assert "hook 20-world-writable refused: mode 0777 is writable by group/others" in text
    assert not IS_ROOT or f"hook 30-nobody refused: owned by uid {NOBODY}" in text


def test_directory_attacks_leave_the_source_serving(svc: Attacked) -> None:
    incoming = svc.root / "incoming"
    (incoming / "zero.npy").symlink_to("/dev/zero")
    os.mkfifo(incoming / "pipe.npy")
    (incoming / "big.npy").write_bytes(b"\x93NUMPY" + b"\0" * (17 * 1024 * 1024))
    (incoming / ("n" * 200 + ".txt")).write_text("x")
    good = incoming / "good.json.part"
    good.write_bytes(GOOD)
    good.rename(incoming / "good.json")
    done = incoming / "done" / "good.json"
    svc.dev.wait(lambda: done.exists(), 30, "the good file after the attacks")
    failed = incoming / "failed"
    svc.dev.wait(lambda: (failed / "big.npy.error.txt").exists(), 10, "big.npy refused")
    assert "symbolic links" in (failed / "zero.npy.error.txt").read_text()
    assert "exceeds the limit" in (failed / "big.npy.error.txt").read_text()
    assert (incoming / "pipe.npy").exists()  # not a regular file: never opened, never moved
    directory = svc.health()["sources"]["directory"]
    assert directory["alive"] is True and directory["errors"] == 0, directory
    assert svc.post(GOOD)[0] == 200


@pytest.mark.parametrize("unsafe", ["group-writable", "world-writable", "owned-by-nobody", "symlink"])
def test_unsafe_hooks_directory_or_link_runs_nothing(tmp_path: Path, unsafe: str) -> None:
    from edgeguard.service import HookRunner

    d = tmp_path / "hooks"
    d.mkdir(mode=0o755)
    out = tmp_path / "ran"
    target = tmp_path / "elsewhere"
    _write_hook(target, f"echo ran >> {out}")
    if unsafe == "symlink":
        (d / "10-link").symlink_to(target)
    else:
        _write_hook(d / "10-hook", f"echo ran >> {out}")
        if unsafe == "group-writable":
            d.chmod(0o775)
        elif unsafe == "world-writable":
            d.chmod(0o1777)
        elif IS_ROOT:
            os.chown(d, NOBODY, NOBODY)
        else:
            pytest.skip("giving a directory away needs root")
    runner = HookRunner(directory=d, timeout_s=5, device_id="dev-1")
    runner.fire("degraded", {"reason": "test"}, wait=True)
    assert not out.exists() and runner.runs == 0 and runner.refused == 1
    # The same hook in a safe directory runs: the refusal above is about owner and mode only.
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    _write_hook(safe / "10-hook", f"echo ran >> {out}")
    HookRunner(directory=safe, timeout_s=5, device_id="dev-1").fire("degraded", wait=True)
    assert out.read_text() == "ran\n"


# ------------------------------------------------------------------------------- config file permissions
def _config_with_password(tmp_path: Path, mode: int) -> Path:
    cfg = tmp_path / "edgeguard.toml"
    cfg.write_text(
        '[device]\nid = "d"\n[model]\nbundle = "m.egm"\ntrust = ["p.pub"]\ndevice_key = "k"\n'
        '[link]\nusername = "dev"\npassword = "hunter2-secret"\n'
    )
    cfg.chmod(mode)
    return cfg


def _run(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeguard", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_with_password_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    cfg = _config_with_password(tmp_path, mode)
    r = _run(cfg)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(cfg) in lines[0] and "link.password" in lines[0] and f"chmod 600 {cfg}" in lines[0]
    assert "hunter2" not in r.stderr + r.stdout


def test_config_secret_never_quoted_in_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeguard.toml"
    cfg.write_text('[device]\nid = "d"\n[model]\nbundle = "m"\ntrust = ["p"]\ndevice_key = "k"\n')
    cfg.write_text(cfg.read_text() + '[link]\nusername = "u"\npassword = 31337424242\n')
    cfg.chmod(0o600)
    r = _run(cfg)
    assert r.returncode == 2 and "link.password" in r.stderr and "31337424242" not in r.stderr, r


def test_config_symlink_is_not_followed(tmp_path: Path) -> None:
    real = _config_with_password(tmp_path, 0o600)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    r = _run(link)
    assert r.returncode == 2 and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


# ---------------------------------------------------------------- files read from places others can write
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.symlink_to("/dev/zero"), "symbolic link"),
        (lambda p: _fifo(p), "not a regular file"),
        (lambda p: p.mkdir(), "directory"),
    ],
    ids=["link-to-dev-zero", "fifo", "directory"],
)
@pytest.mark.parametrize(
    "reader",
    ["tokens", "device key", "trusted key", "revocation list"],
)
def test_every_checked_file_refuses_links_fifos_and_directories(
    tmp_path: Path, make: Callable[[Path], object], reason: str, reader: str
) -> None:
    target = tmp_path / "file"
    make(target)
    errors = (ConfigError, KeyFileError)
    t0 = time.monotonic()
    with pytest.raises(errors, match=reason):
        if reader == "tokens":
            TokenStore.from_file(target)
        elif reader == "device key":
            load_device_key(target)
        elif reader == "trusted key":
            load_trusted_key(target)
        else:
            read_revocation_list(target)
    assert time.monotonic() - t0 < 5  # never blocked on the FIFO


def test_tokens_file_bounded_and_link_refused(tmp_path: Path) -> None:
    real = tmp_path / "tokens"
    real.write_text(f"app infer {INFER}\n" + "# padding\n" * 30_000)
    real.chmod(0o600)
    with pytest.raises(ConfigError, match="larger than the limit"):
        TokenStore.from_file(real)
    real.write_text(f"app infer {INFER}\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        TokenStore.from_file(link)
    real.write_text(f"app infer {'x' * 2000}\n")
    with pytest.raises(ConfigError, match="longer than 1024"):
        TokenStore.from_file(real)


@pytest.mark.parametrize("kind", ["fifo", "link", "device"])
def test_bundle_file_is_opened_checked(tmp_path: Path, kind: str) -> None:
    from edgeguard.bundle import open_bundle
    from edgeguard.keys import TrustStore

    generate_keypair("device", tmp_path / "k")
    path = tmp_path / "model.egm"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        (tmp_path / "real.egm").write_bytes(tiny_bundle(tmp_path))
        path.symlink_to(tmp_path / "real.egm")
    else:
        path.symlink_to("/dev/zero")
    t0 = time.monotonic()
    with pytest.raises(OSError, match="symbolic link" if kind != "fifo" else "not a regular file"):
        open_bundle(
            path, trust=TrustStore(), device_key=load_device_key(tmp_path / "k/device.key"), state_dir=None
        )
    assert time.monotonic() - t0 < 5  # a FIFO is never waited on


def test_private_key_behind_a_link_is_refused(tmp_path: Path) -> None:
    generate_keypair("device", tmp_path / "k")
    (tmp_path / "device.key").symlink_to(tmp_path / "k/device.key")
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_device_key(tmp_path / "device.key")


class SwappingSink(RecordingSink):
    """Runs the request, and during the first one swaps ``victim`` (already scanned and settled) for
    whatever ``swap`` puts there: the window between the directory scan and the read, made exact."""

    def __init__(self, victim: Path, swap: Callable[[Path], None]) -> None:
        super().__init__()
        self.victim, self.swap, self.swapped = victim, swap, False

    def __call__(self, request: InferenceRequest) -> dict[str, Any]:
        if not self.swapped:
            self.swapped = True
            self.swap(self.victim)
        return super().__call__(request)


def _replace_with_link(target: str) -> Callable[[Path], None]:
    def swap(victim: Path) -> None:
        tmp = victim.with_name(".swap")
        tmp.symlink_to(target)
        os.replace(tmp, victim)

    return swap


def _replace_with_fifo(victim: Path) -> None:
    tmp = victim.with_name(".swap")
    os.mkfifo(tmp)
    os.replace(tmp, victim)


def _npy(value: float) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.full((1, 4), value, np.float32))
    return buf.getvalue()


def _unblock_fifo(path: Path) -> None:
    # If a reader is stuck opening a FIFO (the old code), open its other end so that thread can finish.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


@pytest.mark.parametrize(
    "swap",
    [_replace_with_link("/dev/zero"), _replace_with_fifo, "fifo-link"],
    ids=["link-to-dev-zero", "fifo", "link-to-fifo"],
)
def test_directory_file_swapped_after_scan(tmp_path: Path, swap: Any) -> None:
    watch = tmp_path / "in"
    fifo = tmp_path / "outside-fifo"
    if swap == "fifo-link":
        os.mkfifo(fifo)
        swap = _replace_with_link(str(fifo))
    sink = SwappingSink(watch / "b.npy", swap)
    t = [0.0]
    src = DirectorySource(
        config=DirectoryConfig(path=watch, poll_s=0.02, settle_s=1.0, max_file_bytes=4096),
        sink=sink,
        specs=lambda: SPECS,
        clock=lambda: t[0],
    )
    src.prepare()
    for name in ("a.npy", "b.npy", "c.npy"):
        (watch / name).write_bytes(_npy(0.5))
    src.poll_once()  # first sight
    t[0] = 2.0  # every file settled: a, b and c are processed in this poll, b after it was swapped
    src.start()
    try:
        ok = threading.Event()
        done_c = watch / "done" / "c.npy"
        end = time.monotonic() + 20
        while time.monotonic() < end and not done_c.exists():
            ok.wait(0.02)
        assert done_c.exists(), "the file after the swapped one was never processed (source thread stuck)"
        reason = (watch / "failed" / "b.npy.error.txt").read_text()
        assert "symbolic link" in reason or "not a regular file" in reason, reason
        assert src.snapshot()["alive"] is True
    finally:
        _unblock_fifo(fifo)
        _unblock_fifo(watch / "b.npy")
        src.stop(timeout=5)
    assert [r.correlation_id for r in sink.requests] == ["a.npy", "c.npy"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_directory_source_survives_unexpected_errors_and_shows_a_dead_thread(tmp_path: Path) -> None:
    class Failing(RecordingSink):
        def __call__(self, request: InferenceRequest) -> dict[str, Any]:
            if request.correlation_id == "a.npy":
                raise MemoryError  # what a decompression bomb or a runaway parser raises
            if request.correlation_id == "z.npy":
                raise SystemExit  # not caught anywhere: the thread ends
            return super().__call__(request)

    watch = tmp_path / "in"
    sink = Failing()
    src = DirectorySource(
        config=DirectoryConfig(path=watch, poll_s=0.02, settle_s=0.0), sink=sink, specs=lambda: SPECS
    )
    src.prepare()
    (watch / "a.npy").write_bytes(_npy(0.5))
    (watch / "b.npy").write_bytes(_npy(0.5))
    src.start()
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and not (watch / "done" / "b.npy").exists():
            threading.Event().wait(0.02)
        assert (watch / "done" / "b.npy").exists(), "a file after a MemoryError was never processed"
        assert "internal error (MemoryError" in (watch / "failed" / "a.npy.error.txt").read_text()
        assert src.snapshot()["alive"] is True
        (watch / "z.npy").write_bytes(_npy(0.5))
        end = time.monotonic() + 20
        while time.monotonic() < end and not src.dead:
            threading.Event().wait(0.02)
        assert src.dead and src.snapshot()["alive"] is False
    finally:
        src.stop(timeout=5)


def test_a_dead_source_thread_makes_the_device_degraded(tmp_path: Path) -> None:
    """The worker's verdict (behind /v1/health's ``ok``/``alarm`` and the heartbeat) names a source whose
    thread ended; a live one changes nothing."""
    from types import SimpleNamespace

    from edgeguard.service._worker import Worker

    watch = tmp_path / "in"
    src = DirectorySource(config=DirectoryConfig(path=watch), sink=RecordingSink(), specs=lambda: SPECS)
    worker = SimpleNamespace(
        pipeline=SimpleNamespace(oldest_in_flight_s=lambda: 0.0),
        cfg=SimpleNamespace(service=SimpleNamespace(hang_timeout_s=10.0)),
        link=SimpleNamespace(loop_alive=True),
        outbox=SimpleNamespace(stats=lambda: SimpleNamespace(alarm=None)),
        sources=[src],
    )
    assert Worker.verdict(worker)["degraded"] == ""  # type: ignore[arg-type]
    src._thread = threading.Thread(target=lambda: None)  # a thread that has ended without stop()
    src._thread.start()
    src._thread.join()
    assert src.dead
    verdict = Worker.verdict(worker)  # type: ignore[arg-type]
    assert verdict["healthy"] and verdict["degraded"] == "source directory stopped (see the device log)"


# ------------------------------------------------------------------------------------------ echo helper
def test_echo_and_cut_bound_any_text() -> None:
    assert echo("abc") == "'abc'"
    long = echo("x" * 10_000_000)
    assert len(long) < ECHO_MAX_CHARS + 40 and long.endswith("more cut]")
    assert echo(b"\0" * 1000).startswith("b'\\x00")
    assert cut("line one\nline two") == "line one\\nline two"
    assert len(cut("y" * 100_000)) < 500


# ------------------------------------------------------------------- identifiers: no trailing newline
def _refuses(check: str, value: str, tmp_path: Path) -> None:
    """Run the validator behind ``check`` on ``value``; raise what it raises."""
    from edgeguard.bundle._format import BundleLimits
    from edgeguard.bundle._open import _parse_unverified_manifest
    from edgeguard.bundle._rollback import RollbackFloor
    from edgeguard.link import MqttLink
    from edgeguard.link._config import LinkConfig
    from edgeguard.link._inbound import InboundRouter
    from edgeguard.outbox import Outbox
    from edgeguard.service import parse_config

    model = {"bundle": "m", "trust": ["p"], "device_key": "k"}
    if check == "device.id":
        parse_config({"model": model, "device": {"id": value}}, path=tmp_path / "c.toml")
    elif check == "device.fleet":
        parse_config({"model": model, "device": {"id": "d", "fleet": value}}, path=tmp_path / "c.toml")
    elif check == "outbox device id":
        Outbox(path=tmp_path / "ob", storage_key=b"k" * 32, device_id=value).close()
    elif check == "link topic segment":
        ob = Outbox(path=tmp_path / "ob", storage_key=b"k" * 32, device_id="dev-1")
        try:
            MqttLink(config=LinkConfig(), fleet="f", device_id=value, outbox=ob)
        finally:
            ob.close()
    elif check == "link ha_prefix":
        LinkConfig(ha_prefix=value)
    elif check == "inbound topic suffix":
        InboundRouter("edgeguard/v1/f/d/", 1024).add(value, lambda b: None, None)
    elif check == "bundle model name":
        manifest = json.dumps({"format": "onnx", "name": value}).encode()
        try:
            _parse_unverified_manifest(manifest, BundleLimits())
        except Exception as exc:  # a valid name gets past the name check and fails on a later field
            if "name" in str(exc):
                raise
    elif check == "rollback floor name":
        RollbackFloor(tmp_path).get(value)


@pytest.mark.parametrize(
    ("check", "good"),
    [
        ("device.id", "dev-1"),
        ("device.fleet", "fleet"),
        ("outbox device id", "dev-1"),
        ("link topic segment", "dev-1"),
        ("link ha_prefix", "homeassistant"),
        ("inbound topic suffix", "cmd"),
        ("bundle model name", "sensor"),
        ("rollback floor name", "sensor"),
    ],
)
def test_identifier_with_trailing_newline_is_refused(check: str, good: str, tmp_path: Path) -> None:
    _refuses(check, good, tmp_path)  # the validator accepts the plain identifier ...
    with pytest.raises((ValueError, ConfigError, BundleRejected)):
        _refuses(check, good + "\n", tmp_path)  # ... and refuses it with a trailing newline


def test_no_validator_in_the_tree_uses_match() -> None:
    """``re.match``/``Pattern.match`` with ``^...$`` accepts a trailing newline; every validator in the
    package uses ``fullmatch`` (or ``search`` on purpose). This keeps a new ``.match(`` from slipping in."""
    import ast

    import edgeguard

    root = Path(edgeguard.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "match":
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == [], f"use fullmatch: {found}"
