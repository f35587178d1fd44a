"""Remote commands end to end: a real device service with ``[commands]`` enabled, a real mosquitto, and the
operator side (library and ``edgeguard fleet send``) verifying every answer with the device's key."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from edgeguard.cli import main
from tests.commands._support import commands_device, deliver, sender, sign
from tests.service._env import ADMIN, INFER, STATUS, hook_events
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(p) for p in rec.on_topic("/events")) if e["kind"] == kind]


def test_round_trips_ping_status_reload_set_log_level_with_verified_answers(
    tmp_path: Path, capsys: Any
) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev, ops = commands_device(tmp_path, broker)
        dev.start()
        try:
            dev.wait_ready()
            # the birth status announces the answer key, which the device made at first start (0600)
            key_file = tmp_path / "state/device-sign.key"
            assert key_file.stat().st_mode & 0o777 == 0o600
            s = sender(broker, tmp_path)
            try:
                # READY does not wait for the broker (docs/service.md): the birth status may come just after
                dev.wait(lambda: "dev-1" in s.statuses, 30, "the retained birth status")
                status = s.statuses["dev-1"]
                assert status["state"] == "online" and status["groups"] == ["line-2"]
                assert set(s.learned()) == {"dev-1"}

                pong = deliver(s, sign(ops, "ping")).answer
                assert pong is not None and pong.verdict == "verified" and pong.ok
                assert pong.doc["result"] == {"pong": True}

                health = deliver(s, sign(ops, "status")).answer
                assert health is not None and health.ok
                assert health.doc["result"]["state"] == "serving"
                assert health.doc["result"]["model"]["name"] == "sensor"

                reloads = len(_events(rec, "reloaded"))
                reload = deliver(s, sign(ops, "reload")).answer
                assert reload is not None and reload.ok and reload.doc["result"] == {"reload": "started"}
                assert rec.wait_for(lambda _m: len(_events(rec, "reloaded")) > reloads, 30)

                level = deliver(s, sign(ops, "set-log-level", args={"level": "DEBUG"})).answer
                assert level is not None and level.ok
                assert level.doc["result"] == {"level": "DEBUG", "previous": "INFO"}
                dev.wait(lambda: " DEBUG " in dev.log_tail(), 20, "a DEBUG line in the log")

                # a group target and the whole fleet, resolved from the retained statuses
                for to in ("group:line-2", "all"):
                    report = s.send(sign(ops, "ping", to=to), timeout=20)
                    assert list(report.deliveries) == ["dev-1"] and report.all_ok, to
                assert s.send(sign(ops, "ping", to="group:line-9"), timeout=1).deliveries == {}
            finally:
                s.close()
            names = {"ping", "status", "reload", "set-log-level"}
            assert rec.wait_for(lambda _m: names <= {e["name"] for e in _events(rec, "command-accepted")}, 20)
            dev.wait(lambda: "command-accepted" in hook_events(tmp_path / "hooks.log"), 20, "hook")

            # the command line, with the key pinned from the device's .pub
            code = main([
                "fleet", "send", "ping", "--to", "dev-1", "--sign-key", str(tmp_path / "ops/operator.key"),
                "--fleet", "test", "--broker", f"{broker.host}:{broker.port}", "--timeout", "20",
                "--device-keys", f"dev-1={tmp_path / 'state/device-sign.pub'}",
            ])
            out = capsys.readouterr().out
            assert code == 0, out
            assert '✓ dev-1  ok  {"pong": true}' in out and "1/1 answered ok" in out, out
            code = main([
                "fleet", "send", "status", "--to", "all", "--sign-key", str(tmp_path / "ops/operator.key"),
                "--fleet", "test", "--broker", f"{broker.host}:{broker.port}", "--timeout", "20", "--json",
            ])
            doc = json.loads(capsys.readouterr().out)
            assert code == 0 and doc["ok"] is True, doc
            assert doc["answers"][0]["verdict"] == "verified (learned key)", doc
        finally:
            dev.stop()


def test_a_replay_after_kill_9_and_restart_is_refused(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev, ops = commands_device(tmp_path, broker)
        dev.start()
        try:
            dev.wait_ready()
            s = sender(broker, tmp_path)
            cmd = sign(ops, "ping", ttl_s=600)
            try:
                first = deliver(s, cmd).answer
                assert first is not None and first.ok
            finally:
                s.close()
            # a power cut: worker and supervisor killed at once, nothing gets to shut down
            worker = dev.worker_pid()
            assert worker is not None and dev.proc is not None
            os.kill(worker, signal.SIGKILL)
            dev.proc.send_signal(signal.SIGKILL)
            dev.proc.wait(10)
            dev.stop()
            dev.notes.clear()
            dev.start()
            dev.wait_ready()
            s = sender(broker, tmp_path)
            try:
                again = deliver(s, cmd).answer
                assert again is not None and again.verdict == "verified"  # the same key after the restart
                assert again.doc["ok"] is False and again.doc["check"] == "replayed", again.doc
                assert deliver(s, sign(ops, "ping")).answer.ok  # type: ignore[union-attr]
            finally:
                s.close()
        finally:
            dev.stop()


def test_restart_rotate_tokens_and_bad_deploy_rollback_commands(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev, ops = commands_device(tmp_path, broker)
        dev.start()
        try:
            dev.wait_ready()
            s = sender(broker, tmp_path)
            try:
                # rotate-tokens: new secrets on disk (0600), applied at once; only fingerprints leave
                rotated = deliver(s, sign(ops, "rotate-tokens", args={"name": "app"})).answer
                assert rotated is not None and rotated.ok, rotated.doc
                [entry] = rotated.doc["result"]["rotated"]
                assert entry["name"] == "app" and len(entry["fingerprint"]) == 16
                tokens = (tmp_path / "tokens").read_text()
                assert INFER not in tokens and (tmp_path / "tokens").stat().st_mode & 0o777 == 0o600
                new = next(line.split()[2] for line in tokens.splitlines() if line.startswith("app "))
                assert new not in json.dumps(rotated.doc) and new not in b"".join(rec.on_topic("")).decode()
                assert dev.request("POST", "/v1/infer", GOOD, token=INFER)[0] == 401
                assert dev.request("POST", "/v1/infer", GOOD, token=new)[0] == 200
                assert dev.request("GET", "/v1/health", token=STATUS)[0] == 200  # the others kept theirs

                # deploy without its arguments, rollback with nothing deployed (tests/deploy has the rest)
                ans = deliver(s, sign(ops, "deploy")).answer
                assert ans is not None and ans.doc["check"] == "malformed", ans.doc
                ans = deliver(s, sign(ops, "rollback")).answer
                assert ans is not None and ans.doc["check"] == "failed", ans.doc
                assert "no previous slot" in ans.doc["reason"]

                # restart: answered first, then a clean restart through the supervisor (no failure counted)
                old = dev.worker_pid()
                ans = deliver(s, sign(ops, "restart")).answer
                assert ans is not None and ans.ok and ans.doc["result"] == {"restart": "requested"}
                dev.wait(lambda: dev.restarted(old), 60, "a new worker")
                _, health = dev.request("GET", "/v1/health", token=STATUS)
                assert health["supervisor"]["failures"] == 0, health["supervisor"]  # not a crash
                # and it takes commands again
                ping = deliver(s, sign(ops, "ping")).answer
                assert ping is not None and ping.ok
            finally:
                s.close()
            assert dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)[0] == 200
        finally:
            dev.stop()
