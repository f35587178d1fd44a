"""Intrusion detection on the real service (supervisor + worker child processes, a real mosquitto, real
files and sockets): the integrity monitor notices a replaced trusted key or an edited tokens file (alert,
or refusal to serve under the refuse policy), and a burst of bad tokens from one client locks that client
out while another keeps being served. Plus the lockout's backoff and the rate-anomaly detector on a
controlled clock."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from edgeguard.audit import log_files, parse_line
from edgeguard.keys import generate_keypair
from edgeguard.sources._abuse import AbuseConfig, LockoutTable, RateWatch
from tests.service._env import ADMIN, INFER, STATUS, Device, tiny_bundle
from tests.support.broker import MosquittoBroker, Recorder

GOOD = b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}'
_FAST_CHECKS = "\n[integrity]\ninterval_s = 1\npolicy = \"{policy}\"\n"


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


def _request_from(dev: Device, source: str, token: str) -> tuple[int, dict[str, str], Any]:
    """An inference request from another local address (all of 127/8 is this host): another API client."""
    conn = http.client.HTTPConnection("127.0.0.1", dev.port, timeout=30, source_address=(source, 0))
    conn.request("POST", "/v1/infer", body=GOOD, headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else None


def test_replaced_trusted_key_raises_an_integrity_alert(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), extra=_FAST_CHECKS.format(policy="alert"))
        dev.start()
        try:
            dev.wait_ready()
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert health["security"]["integrity"]["state"] == "ok", health["security"]
            # Someone puts their own publisher key where the trusted one was.
            attacker = tmp_path / "attacker"
            generate_keypair("publisher", attacker)
            (tmp_path / "keys/publisher.pub").write_bytes((attacker / "publisher.pub").read_bytes())
            assert rec.wait_for(lambda _m: bool(_events(rec, "integrity-alert")), 30), dev.log_tail()
            alert = _events(rec, "integrity-alert")[0]
            assert alert["policy"] == "alert"
            assert any("keys/publisher.pub: modified" in c for c in alert["changed"]), alert
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200, health
            sec = health["security"]
            assert sec["integrity"]["state"] == "changed" and "publisher.pub" in sec["last_alert"]["reason"]
            assert dev.request("POST", "/v1/infer", GOOD)[0] == 200  # alert only: still serving
            beat = json.loads(rec.on_topic("/heartbeat")[-1])
            assert rec.wait_for(lambda _m: json.loads(rec.on_topic("/heartbeat")[-1])["security"]
                                ["integrity"]["state"] == "changed", 10), beat
        finally:
            assert dev.stop() == 0
    assert any("publisher.pub" in a["reason"] for a in _audited(dev, "integrity-alert"))


def test_refuse_policy_stops_serving_when_the_tokens_file_changes(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path), extra=_FAST_CHECKS.format(policy="refuse"))
        dev.start()
        try:
            dev.wait_ready()
            assert dev.request("POST", "/v1/infer", GOOD)[0] == 200
            tokens = tmp_path / "tokens"
            tokens.write_text(tokens.read_text() + "intruder admin,infer,status intruder-token-0123456789\n")
            assert rec.wait_for(lambda _m: bool(_events(rec, "integrity-alert")), 30), dev.log_tail()
            code, err = dev.request("POST", "/v1/infer", GOOD)
            assert code == 503 and "integrity" in err["error"] and "tokens: modified" in err["error"], err
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 503 and health["state"] == "no-model", health
            assert "integrity" in health["degraded_reason"]
            # The operator meant it: a reload takes the files as the new baseline and serving resumes.
            assert dev.request("POST", "/v1/admin/reload", b"{}", token=ADMIN)[0] == 200
            dev.wait(lambda: dev.request("POST", "/v1/infer", GOOD)[0] == 200, 30, "serving again")
            # The event travels over MQTT on its own schedule: serving again does not mean it has arrived.
            assert rec.wait_for(lambda _m: bool(_events(rec, "config-changed")), 30), dev.log_tail()
        finally:
            assert dev.stop() == 0
    assert _audited(dev, "integrity-alert") and _audited(dev, "config-changed")


def test_bad_token_burst_locks_out_that_client_only(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        # lockout_loopback: the two clients are told apart by their loopback addresses here.
        lock = "lockout_failures = 10\nlockout_initial_s = 30\nlockout_loopback = true\n"
        dev.provision(tiny_bundle(tmp_path), api_extra=lock)
        dev.start()
        try:
            dev.wait_ready()
            answers = []
            for i in range(20):
                answers.append(_request_from(dev, "127.0.0.2", f"guess-{i:020d}"))
                # Another client with a good token is served all along.
                assert _request_from(dev, "127.0.0.1", INFER)[0] == 200
            codes = [a[0] for a in answers]
            assert codes == [401] * 10 + [429] * 10, codes
            assert 1 <= int(answers[-1][1]["Retry-After"]) <= 30
            # Locked out means locked out: even a good token from that client waits.
            assert _request_from(dev, "127.0.0.2", INFER)[0] == 429
            assert rec.wait_for(lambda _m: bool(_events(rec, "api-lockout")), 20)
            lock = _events(rec, "api-lockout")
            assert len(lock) == 1 and lock[0]["client"] == "127.0.0.2" and lock[0]["locked_s"] == 30
            code, health = dev.request("GET", "/v1/health", token=STATUS)
            assert code == 200, health
            sec = health["security"]
            assert sec["lockouts"] == 1 and sec["locked_clients"] == 1 and sec["auth_failures"] == 10, sec
            assert "127.0.0.2 locked out for 30 s" in sec["last_alert"]["reason"], sec
        finally:
            assert dev.stop() == 0
    assert len(_audited(dev, "api-lockout")) == 1 and len(_audited(dev, "token-refused")) == 9


def test_loopback_lockout_by_default_answers_failures_only(tmp_path: Path) -> None:
    """Every local process shares the loopback address: by default a burst there is detected and its
    failures answered with Retry-After, while valid tokens from the same address are still served."""
    with MosquittoBroker(tmp_path) as broker, Recorder(broker, "edgeguard/v1/#") as rec:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start()
        try:
            dev.wait_ready()
            answers = []
            for i in range(20):
                answers.append(_request_from(dev, "127.0.0.1", f"guess-{i:020d}"))
                assert _request_from(dev, "127.0.0.1", INFER)[0] == 200
            assert [a[0] for a in answers] == [401] * 20
            assert ["Retry-After" in a[1] for a in answers] == [False] * 10 + [True] * 10
            assert rec.wait_for(lambda _m: bool(_events(rec, "api-lockout")), 20)
            assert len(_events(rec, "api-lockout")) == 1
        finally:
            assert dev.stop() == 0


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lockout_backs_off_exponentially_and_stays_bounded() -> None:
    clock = _Clock()
    table = LockoutTable(AbuseConfig(lockout_failures=3, lockout_initial_s=10, lockout_max_s=40,
                                     max_clients=16), now=clock)
    got = []
    for _ in range(4):
        got.append([table.failure("a") for _ in range(3)][-1])
        clock.t += table.retry_after("a")
        assert table.retry_after("a") == 0
    assert got == [10, 20, 40, 40]
    clock.t += 100  # well-behaved for longer than lockout_max_s: the backoff starts over
    assert [table.failure("a") for _ in range(3)][-1] == 10
    for i in range(1000):  # many clients: the table does not grow past max_clients
        table.failure(f"c{i}")
    assert len(table._clients) <= 16


def test_request_rate_anomaly_against_the_token_baseline() -> None:
    clock = _Clock()
    cfg = AbuseConfig(rate_anomaly_factor=5, rate_anomaly_window_s=10, rate_anomaly_min_requests=20)
    watch = RateWatch(cfg, now=clock)
    found = []
    for _ in range(30):  # a steady 2 requests/s for 5 minutes: the baseline, nothing to report
        for _ in range(20):
            found.append(watch.hit("app"))
            clock.t += 0.5
    assert not any(found)
    hits = []
    for _ in range(150):  # then 150 requests within one second: a scrape
        hits.append(watch.hit("app"))
        clock.t += 1 / 150
    anomalies = [h for h in hits if h]
    assert len(anomalies) == 1 and anomalies[0]["token_name"] == "app", anomalies
    assert anomalies[0]["baseline_per_s"] == 2.0 and watch.anomalies == 1
