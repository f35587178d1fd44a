"""Attacks on the remote-command boundary, against the real service (supervisor + worker child processes) and
a real mosquitto: each bad command is refused with its exact reason in an answer signed by the device's key,
is an event, and leaves the service serving."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.cli import main
from edgeguard.commands import ANSWER_LABEL, envelope
from edgeguard.fleet.commands import SignedCommand
from edgeguard.keys import generate_keypair
from tests.commands._support import commands_device, deliver, operator, sender, sign
from tests.service._env import STATUS, hook_events
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'


def _refusals(rec: Recorder) -> list[dict[str, Any]]:
    return [
        e for e in (json.loads(p) for p in rec.on_topic("/events")) if e["kind"] == "command-refused"
    ]


def test_bad_commands_are_refused_with_a_signed_reason_and_the_service_keeps_serving(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev, ops = commands_device(tmp_path, broker)
        dev.start()
        try:
            dev.wait_ready()
            s = sender(broker, tmp_path)  # pins state/device-sign.pub, made by the device at first start
            try:
                assert "dev-1" in s.pinned
                now = int(time.time())
                stranger = operator(tmp_path, "stranger")
                revoked = operator(tmp_path, "ops-revoked")
                good = sign(ops, "ping")
                env = json.loads(good.data)
                forged_sig = dict(env, sig=json.loads(sign(stranger, "ping").data)["sig"])
                cases: list[tuple[str, SignedCommand, str]] = [
                    ("forged", SignedCommand(good.nonce, "ping", good.target,
                                             json.dumps(forged_sig).encode()), "signature"),
                    ("unknown signer", sign(stranger, "ping"), "untrusted signer"),
                    ("revoked signer", sign(revoked, "ping"), "revoked"),
                    ("expired", sign(ops, "ping", now=now - 1000, ttl_s=300), "expired"),
                    ("from the future", sign(ops, "ping", now=now + 1000), "not yet valid"),
                    ("other device", sign(ops, "ping", to="dev-2"), "target"),
                    ("other group", sign(ops, "ping", to="group:line-3"), "target"),
                    ("other fleet", sign(ops, "ping", to="all", fleet="elsewhere"), "fleet"),
                    ("deploy without arguments", sign(ops, "deploy"), "malformed"),
                    ("bad argument", sign(ops, "set-log-level", args={"level": "LOUD"}), "malformed"),
                ]
                for what, cmd, check in cases:
                    d = deliver(s, cmd)
                    assert d.answer is not None and d.answer.verdict == "verified", what
                    doc = d.answer.doc
                    assert doc["ok"] is False and doc["check"] == check, (what, doc)
                    assert doc["nonce"] == cmd.nonce and doc["device"] == "dev-1", (what, doc)
                    assert doc["reason"], what
                # the deploy refusal says which argument is wrong
                deploy = deliver(s, sign(ops, "deploy")).answer
                assert deploy is not None and "sha256" in deploy.doc["reason"]

                # replay: the same bytes twice
                ping = sign(ops, "ping")
                assert deliver(s, ping).answer.ok  # type: ignore[union-attr]
                again = deliver(s, ping).answer
                assert again is not None and again.doc["check"] == "replayed", again.doc

                # oversize (over commands.max_bytes): answered with nonce null, since the size is known
                # before anything is parsed and the nonce is not
                big = SignedCommand("", "ping", ("device", "dev-1"), b"{" + b" " * 8192 + b"}")
                d = deliver(s, big)
                assert d.answer is not None and d.answer.doc["check"] == "too large", d.answer.doc
                assert d.answer.doc["nonce"] is None and "8194 bytes" in d.answer.doc["reason"]

                # malformed envelope: an event only (no nonce to answer to)
                s.send(SignedCommand("", "", ("device", "dev-1"), b"\xff not json"), timeout=0.01,
                       devices=["dev-1"])
                ping = sign(ops, "ping")
                after = deliver(s, ping).answer
                assert after is not None and after.ok

                def answered() -> list[tuple[Any, Any]]:
                    envs = [json.loads(p) for p in rec.on_topic("/cmd/resp")]
                    docs = [json.loads(base64.b64decode(e["payload"])) for e in envs]
                    return [(d.get("nonce"), d.get("check")) for d in docs]

                # answers leave in order (one command thread, one link, one subscription here): the ping's
                # answer follows the too-large one directly, nothing answered the malformed message
                assert rec.wait_for(lambda _m: (ping.nonce, None) in answered(), 20)
                got = answered()
                assert got[got.index((ping.nonce, None)) - 1] == (None, "too large"), got
                assert (None, "malformed") not in got, got
                # events leave on the link's 50 ms tick: wait for them, do not assume they are here yet
                assert rec.wait_for(
                    lambda _m: any(e["check"] == "malformed" and e["nonce"] is None for e in _refusals(rec)),
                    20,
                ), _refusals(rec)

                # every refusal above was an event with its check
                expected = {c for _, _, c in cases} | {"replayed", "too large"}
                assert rec.wait_for(lambda _m: expected <= {e["check"] for e in _refusals(rec)}, 20), (
                    expected, {e["check"] for e in _refusals(rec)})
                # the hooks saw them too
                assert dev.wait(lambda: "command-refused" in hook_events(tmp_path / "hooks.log"), 20,
                                "command-refused hook") is None
            finally:
                s.close()
            # still serving
            code, out = dev.request("POST", "/v1/infer", GOOD)
            assert code == 200, out
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200 and health["ok"] is True
        finally:
            dev.stop()


def test_forged_answer_is_shown_as_forged_by_fleet_send(tmp_path: Path, capsys: Any) -> None:
    """No device answers dev-9's commands but an impostor, which signs with its own key: `fleet send` marks
    the answer forged (✗), does not count it, and exits 1."""
    generate_keypair("operator", tmp_path / "ops")
    generate_keypair("device-sign", tmp_path / "dev-9")  # the key pinned for dev-9 (not the impostor's)
    impostor = Ed25519PrivateKey.generate()
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/test/dev-9/cmd", qos=1) as rec:

        def impostor_answers() -> None:
            assert rec.wait_for(bool, 30)
            nonce = json.loads(base64.b64decode(json.loads(rec.snapshot()[0][1])["payload"]))["nonce"]
            body = {"v": 1, "nonce": nonce, "device": "dev-9", "fleet": "test", "time": int(time.time()),
                    "name": "ping", "ok": True, "result": {"pong": True}}
            forged = envelope(body, impostor, ANSWER_LABEL)
            rec.client.publish("edgeguard/v1/test/dev-9/cmd/resp", forged, qos=1)

        t = threading.Thread(target=impostor_answers, daemon=True)
        t.start()
        code = main([
            "fleet", "send", "ping", "--to", "dev-9", "--sign-key", str(tmp_path / "ops/operator.key"),
            "--fleet", "test", "--broker", f"{broker.host}:{broker.port}", "--timeout", "3",
            "--device-keys", f"dev-9={tmp_path / 'dev-9/device-sign.pub'}",
        ])
        t.join(5)
    out = capsys.readouterr().out
    assert code == 1
    assert "✗ dev-9  FORGED answer: signed by key" in out, out
    assert "0/1 answered ok" in out, out


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_a_flood_of_bad_commands_stays_bounded_and_every_one_is_accounted_for(tmp_path: Path) -> None:
    """300 malformed commands as fast as the broker takes them: no thread (or hook process) per message,
    each is counted as refused, its hooks run or are counted as dropped, and the device answers afterwards."""
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/test/dev-1/events") as rec:
        # room for every refusal event at once, so that the test can count them all
        dev, ops = commands_device(tmp_path, broker, link_extra="events_max_queued = 1024")
        dev.start()
        try:
            dev.wait_ready()
            s = sender(broker, tmp_path)
            try:
                assert deliver(s, sign(ops, "ping")).answer.ok  # type: ignore[union-attr]
                worker = dev.worker_pid()
                assert worker is not None
                before = _threads(worker)
                infos = [rec.client.publish("edgeguard/v1/test/dev-1/cmd", b"\x00junk%d" % i, qos=1)
                         for i in range(300)]
                for info in infos:
                    info.wait_for_publish(30)
                during = _threads(worker)
                assert during <= before + 3, (before, during)
                # all handled (refused as malformed, or as busy while 16 were queued: the queue is bounded)
                assert rec.wait_for(lambda _m: len(_refusals(rec)) >= 300, 60), len(_refusals(rec))
                status = deliver(s, sign(ops, "status")).answer
                assert status is not None and status.ok
                counts = status.doc["result"]["commands"]
                assert counts["refused"] == 300, counts
                assert counts["accepted"] == 2, counts
            finally:
                s.close()
            hooks_log = tmp_path / "hooks.log"

            def hooked() -> int:
                return hook_events(hooks_log).count("command-refused")

            dev.wait(lambda: hooked() + counts["hooks_dropped"] == 300, 60, "hooks run or counted")
            code, _ = dev.request("POST", "/v1/infer", GOOD)
            assert code == 200
        finally:
            dev.stop()


def test_a_command_over_the_links_packet_limit_is_answered_too_large_on_mqtt_311(tmp_path: Path) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size: the broker delivers the oversize packet, the link discards it
    unread (never buffered) and the command service answers it like the gate would, nonce null."""
    with MosquittoBroker(tmp_path) as broker:
        dev, ops = commands_device(tmp_path, broker, link_extra='protocol = "3.1.1"')
        dev.start()
        try:
            dev.wait_ready()
            s = sender(broker, tmp_path)
            try:
                big = SignedCommand("", "ping", ("device", "dev-1"), b"x" * (1100 * 1024))
                d = deliver(s, big)
                assert d.answer is not None and d.answer.verdict == "verified"
                assert d.answer.doc["check"] == "too large" and d.answer.doc["nonce"] is None, d.answer.doc
                assert "exceeds the limit of 1048576" in d.answer.doc["reason"], d.answer.doc
                assert deliver(s, sign(ops, "ping")).answer.ok  # type: ignore[union-attr]
            finally:
                s.close()
        finally:
            dev.stop()
