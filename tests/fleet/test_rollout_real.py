"""A 3-wave rollout over 20 REAL device services (`edgeguard run`, provisioned from their fleet archives,
mutual TLS through the fleet's generated mosquitto) halting at the canary when the canary fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fleet._fleet import TlsClient, ok
from tests.fleet._rollout import DEVICES, make_tls_fleet20, run, state
from tests.service._env import TINY_META, tiny_onnx
from tests.support.broker import free_port

pytestmark = pytest.mark.timeout(900)
PREFIX = "edgeguard/v1/plant"


def _serving(payload: bytes) -> tuple[str, int] | None:
    try:
        m = json.loads(payload).get("model") or {}
        return m.get("name"), m.get("version")
    except ValueError:
        return None


def test_three_waves_over_20_real_devices_halt_at_the_canary(tmp_path: Path, okay_nabu_path: Path) -> None:
    fleet, broker = make_tls_fleet20(tmp_path, okay_nabu_path, operators=("ops", "watch"))
    procs: list[subprocess.Popen[bytes]] = []
    ops = None
    try:
        (tmp_path / "tiny.onnx").write_bytes(tiny_onnx())
        (tmp_path / "tiny4.onnx").write_bytes(tiny_onnx(3.0))
        (tmp_path / "meta.json").write_text(json.dumps(TINY_META))
        first = tmp_path / "v3.egm"
        ok(
            "fleet",
            "seal",
            "-f",
            fleet.root,
            tmp_path / "tiny.onnx",
            "--name",
            "sensor",
            "--version",
            "3",
            "--to",
            "line-1",
            "--meta",
            tmp_path / "meta.json",
            "-o",
            first,
        )
        # v4 for everyone but the canary's first device: dev-00 refuses it (not a recipient)
        v4 = tmp_path / "v4.egm"
        ok(
            "fleet",
            "seal",
            "-f",
            fleet.root,
            tmp_path / "tiny4.onnx",
            "--name",
            "sensor",
            "--version",
            "4",
            "--to",
            *DEVICES[1:],
            "--meta",
            tmp_path / "meta.json",
            "-o",
            v4,
        )
        key_id = _fleet_key_id(fleet.root)
        for dev in DEVICES:
            board = tmp_path / "boards" / dev
            ok("provision", fleet.root / f"archives/{dev}.egp", "--root", board, "--fleet-key-id", key_id)
            shutil.copy(first, board / "var/lib/edgeguard/model.egm")
            etc = board / "etc/edgeguard"
            cfg = (etc / "edgeguard.toml").read_text()
            cfg = re.sub(r"port = 8780", f"port = {free_port()}", cfg)
            (etc / "edgeguard.toml").write_text(cfg)
            creds = board / "credentials"
            creds.mkdir(mode=0o700)
            shutil.copy(etc / "device.key", creds / "device-key")
            shutil.copy(etc / "api-tokens", creds / "api-tokens")
            env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "EDGEGUARD_LOG": "INFO"}
            env.pop("NOTIFY_SOCKET", None)
            log = (board / "service.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edgeguard", "run", "-c", str(etc / "edgeguard.toml")],
                    env=env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
        ops = TlsClient(
            "127.0.0.1",
            broker.port,
            ca=fleet.root / "ca/ca.pem",
            cert=fleet.root / "operators/watch/client.pem",
            key=fleet.root / "operators/watch/client.key",
            name="ops-watch",
        )
        assert ops.wait_connected()
        ops.subscribe(f"{PREFIX}/+/heartbeat")
        started = time.monotonic()
        assert ops.wait_for(
            lambda m: {t.split("/")[3] for t, p in m if _serving(p) == ("sensor", 3)} == set(DEVICES),
            timeout=600,
        ), (tmp_path / "boards/dev-00/service.log").read_text()[-2000:]
        print(f"\n20 real devices serving in {time.monotonic() - started:.1f} s")
        t0 = time.monotonic()
        res = run(
            [
                sys.executable,
                "-m",
                "edgeguard",
                "fleet",
                "rollout",
                "-f",
                str(fleet.root),
                str(v4),
                "--to",
                "line-1",
                "--id",
                "real",
                "--canary",
                "10%",
                "--then",
                "25%,100%",
                "--max-failures",
                "0",
                "--probation",
                "30",
                "--operator",
                "ops",
            ],
            timeout=600,
        )
        print(f"rollout halted in {time.monotonic() - t0:.1f} s:", res.stdout, res.stderr)
        assert res.returncode == 1, res.stdout + res.stderr
        doc = state(fleet, "real")
        assert doc["state"] == "halted"
        canary = doc["waves"][0]
        assert canary["devices"] == ["dev-00", "dev-01"]
        assert canary["failed"]["dev-00"].startswith("refused: "), canary
        assert canary["rolled_back"] == ["dev-01"], canary
        assert [w["state"] for w in doc["waves"][1:]] == ["pending", "pending"]
        # dev-01 serves v3 again; nobody beyond the canary ever ran v4
        n = len(ops.messages)
        assert ops.wait_for(
            lambda m: any(t.endswith("dev-01/heartbeat") and _serving(p) == ("sensor", 3) for t, p in m[n:]),
            timeout=120,
        )
        assert not any(
            _serving(p) == ("sensor", 4)
            for t, p in ops.messages
            if t.split("/")[3] not in ("dev-00", "dev-01")
        )
        # then a good release goes through all three waves
        v5 = tmp_path / "v5.egm"
        ok(
            "fleet",
            "seal",
            "-f",
            fleet.root,
            tmp_path / "tiny4.onnx",
            "--name",
            "sensor",
            "--version",
            "5",
            "--to",
            "line-1",
            "--meta",
            tmp_path / "meta.json",
            "-o",
            v5,
        )
        t0 = time.monotonic()
        res = run(
            [
                sys.executable,
                "-m",
                "edgeguard",
                "fleet",
                "rollout",
                "-f",
                str(fleet.root),
                str(v5),
                "--to",
                "line-1",
                "--id",
                "good",
                "--canary",
                "5%",
                "--then",
                "25%,100%",
                "--probation",
                "3",
                "--operator",
                "ops",
            ],
            timeout=600,
        )
        print(f"good rollout in {time.monotonic() - t0:.1f} s:", res.stdout, res.stderr)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        if ops is not None:
            ops.close()
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        broker.kill()


def _fleet_key_id(root: Path) -> str:
    from edgeguard.keys import load_trusted_key, public_key_id

    return public_key_id(load_trusted_key(root / "keys/publisher.pub"))
