"""Per-token query budgets on the real service (supervisor + worker child processes, a real mosquitto, real
sockets and files): a token that uses up its budget is answered 429 with Retry-After while other tokens are
served, the exhaustion is an event, an audit record and a heartbeat count, and neither a ``kill -9`` of the
worker nor a restart of the service hands out a fresh budget."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeguard.audit import log_files, parse_line
from tests.service._env import ADMIN, INFER, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
WINDOW = 8
EVERY = 3
# The timer never writes during the test: only the N-th query and a clean stop do, so the counts are exact.
BUDGET = (f"\n[sources.api.budget]\npersist_every_queries = {EVERY}\npersist_interval_s = 3600\n"
          f"[sources.api.budget.tokens.app]\nwindow_queries = {WINDOW}\n")


def _infer(dev: Device, token: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", dev.port, timeout=30)
    conn.request("POST", "/v1/infer", body=GOOD,
                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(p) for p in rec.on_topic("/events")) if e["kind"] == kind]


def _audited(dev: Device, kind: str) -> list[dict[str, Any]]:
    out = []
    for f in log_files(dev.state / "audit"):
        for line in f.read_bytes().splitlines():
            r = parse_line(line)
            if r is not None and r.kind == kind:
                out.append(r.data)
    return out


Answer = tuple[int, dict[str, str], bytes]


def _served_until_refused(dev: Device, token: str, most: int) -> tuple[int, Answer]:
    for served in range(most + 1):
        answer = _infer(dev, token)
        if answer[0] != 200:
            return served, answer
    raise AssertionError(f"{token[:3]}: still served after {most} queries")


def test_budget_is_enforced_and_survives_kill_9_and_restart(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), extra=BUDGET)
        dev.start()
        try:
            dev.wait_ready()
            for _ in range(EVERY + 1):  # the 3rd query writes the state; the 4th is unwritten
                assert _infer(dev, INFER)[0] == 200
            old = dev.worker_pid()
            assert old is not None
            os.kill(old, signal.SIGKILL)
            dev.wait(lambda: dev.restarted(old), 90, "worker restarted after kill -9")
            # The restarted worker assumes the worst for the unwritten interval (EVERY - 1 queries), so at
            # most the true remainder (WINDOW - 4) is served, exactly WINDOW - EVERY - (EVERY - 1).
            served, (code, headers, body) = _served_until_refused(dev, INFER, WINDOW)
            assert served == WINDOW - EVERY - (EVERY - 1), served
            assert code == 429, body
            assert body.count(b"\n") <= 1 and json.loads(body)["status"] == 429
            reason = json.loads(body)["error"]
            assert "query budget of token 'app' used up" in reason, reason
            retry = headers["Retry-After"]
            assert retry.isdigit() and 1 <= int(retry) <= 86400, retry
            # Other tokens are served all along, the service keeps serving.
            assert _infer(dev, ADMIN)[0] == 200
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            budgets = health["security"]["budgets"]
            assert budgets["enabled"] and budgets["budget_refused"] >= 1 and budgets["exhausted_tokens"] == 1
            assert budgets["tokens"][0]["token_name"] == "app" and budgets["tokens"][0]["used"] == WINDOW
            assert rec.wait_for(lambda _m: bool(_events(rec, "query-budget-exhausted")), 30), dev.log_tail()
            event = _events(rec, "query-budget-exhausted")[0]
            assert event["token_name"] == "app" and event["window_queries"] == WINDOW
            assert rec.wait_for(
                lambda _m: json.loads(rec.on_topic("/heartbeat")[-1])["security"]["budgets"]
                .get("exhausted_tokens") == 1, 30)
        finally:
            assert dev.stop() == 0
        assert len(_audited(dev, "query-budget-exhausted")) == 1
        # A clean restart of the whole service: still used up (and not charged again, nothing unwritten).
        dev.notes = []  # READY=1 of the first run must not count for the second
        dev.start()
        try:
            dev.wait_ready()
            code, headers, body = _infer(dev, INFER)
            assert code == 429 and "used up" in json.loads(body)["error"], body
            assert _infer(dev, ADMIN)[0] == 200
        finally:
            assert dev.stop() == 0
    state = json.loads((dev.state / "query-budgets.json").read_text())
    assert state["clean"] is True and state["tokens"]["app"][3] == WINDOW


def test_rate_limit_answers_429_with_retry_after_and_other_tokens_are_served(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        # One query per 1000 s, a burst of 2: the third query in a row is refused whatever the load.
        dev.provision(tiny_bundle(tmp_path),
                      extra="\n[sources.api.budget.tokens.app]\nrate_per_s = 0.001\nburst = 2\n")
        dev.start()
        try:
            dev.wait_ready()
            answers = [_infer(dev, INFER) for _ in range(3)]
            assert [a[0] for a in answers] == [200, 200, 429], answers
            assert 1 <= int(answers[2][1]["Retry-After"]) <= 1000
            assert "rate limit of token 'app'" in json.loads(answers[2][2])["error"]
            assert all(_infer(dev, ADMIN)[0] == 200 for _ in range(5))
            _code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert health["security"]["budgets"]["rate_limited"] == 1
        finally:
            assert dev.stop() == 0


def test_malformed_budget_config_exits_2_with_one_line(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), extra="\n[sources.api.budget.tokens.app]\nwindow_queries = -5\n")
        proc = subprocess.run([sys.executable, "-m", "edgeguard", "run", "-c", str(dev.config)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "sources.api.budget.tokens.app" in lines[0] and "window_queries" in lines[0], lines
