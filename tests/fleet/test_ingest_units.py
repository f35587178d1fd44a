"""The gatekeeper and the config, table-driven (no broker, no database)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeguard.errors import ConfigError
from edgeguard.fleet.ingest._config import build_config, load_ingest_config
from edgeguard.fleet.ingest._parse import MessageRow, Rejected, ResultRow, parse_message
from tests.fleet._support import REPO, envelope

NOW = 1_790_000_000.0
T = "edgeguard/v1/f/cam-1/"


def _parse(topic: str, payload: bytes) -> ResultRow | MessageRow:
    return parse_message(topic, payload, fleet="f", received=NOW + 1, max_payload_bytes=4096)


def test_a_device_result_becomes_a_row_keyed_by_its_id() -> None:
    row = _parse(T + "results", envelope("cam-1", 42, created=NOW, data=b'{"a":[1,2]}', priority=True))
    assert row == ResultRow("cam-1:42", "f", "cam-1", 42, "result", True, NOW, NOW + 1, '{"a":[1,2]}')


def test_other_messages_are_keyed_by_a_digest_and_timed_by_the_device_when_plausible() -> None:
    hb = json.dumps({"time": NOW, "sequence": 3}).encode()
    a, b = _parse(T + "heartbeat", hb), _parse(T + "heartbeat", hb)
    assert isinstance(a, MessageRow) and a == b and a.table == "heartbeats" and a.time == NOW
    lwt = _parse(T + "status", b'{"state":"offline","device":"cam-1"}')  # the broker's LWT has no time
    assert isinstance(lwt, MessageRow) and lwt.table == "device_status" and lwt.time == NOW + 1
    assert _parse(T + "events", b'{"kind":"x","time":1}').time == NOW + 1  # type: ignore[union-attr]


def _res(**kw: object) -> bytes:
    doc: dict[str, object] = {
        "id": "cam-1:1",
        "seq": 1,
        "kind": "result",
        "priority": False,
        "created": NOW,
        "data": {},
    }
    doc.update(kw)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("edgeguard/v1/other/cam-1/results", _res(), "topic outside"),
        ("edgeguard/v1/f/cam-1/results/x", _res(), "topic outside"),
        ("edgeguard/v1/f/+/results", _res(), "bad device name"),
        ("edgeguard/v1/f/cam-1/cmd", _res(), "unknown topic kind"),
        (T + "results", b"x" * 4097, "exceeds 4096"),
        (T + "results", b"\xff\xfe", "not JSON"),
        (T + "results", b"[]", "not a JSON object"),
        (T + "results", b'{"a":Infinity}', "Infinity not allowed"),
        (T + "results", b"[" * 1500 + b"]" * 1500, "nested too deeply"),
        (T + "results", _res(data={"s": "\x00"}), "\\u0000"),
        (
            T + "results",
            b'{"id":"cam-1:1","seq":1,"kind":"r","created":1790000000,"data":"\\udc00"}',
            "surrogate",
        ),
        (T + "results", _res(id="cam-2:1"), "of the publishing device"),
        (T + "results", _res(id="cam-1:2"), "of the publishing device"),
        (T + "results", _res(seq=-1, id="cam-1:-1"), "seq"),
        (T + "results", _res(seq=True), "seq"),
        (T + "results", _res(seq=2**63, id=f"cam-1:{2**63}"), "seq"),
        (T + "results", _res(kind="a b"), "kind"),
        (T + "results", _res(kind=7), "kind"),
        (T + "results", _res(priority="yes"), "priority"),
        (T + "results", _res(created=0), "created"),
        (T + "results", _res(created="now"), "created"),
        (T + "results", _res(created=...), "created"),
        (T + "results", _res(data=...), "no data"),
        (T + "heartbeat", b'{"a":"\\ud800"}', "surrogate"),
    ],
)
def test_bad_messages_are_rejected_with_a_one_line_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        _parse(topic, payload)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_config_from_toml_with_cli_overrides(tmp_path: Path) -> None:
    path = tmp_path / "edgeguard.toml"
    path.write_text(
        '[device]\nid = "ignored"\n[ingest]\nfleet = "site-b"\ndsn = "dbname=x"\nbatch_max = 50\n'
        'status_file = "/run/x.json"\n[ingest.broker]\nhost = "broker.lan"\npassword = "s3cret"\n'
        'username = "u"\n'
    )
    cfg = load_ingest_config(path, batch_max=None, flush_interval_s=0.5, broker_port=8883)
    assert (cfg.fleet, cfg.batch_max, cfg.flush_interval_s) == ("site-b", 50, 0.5)
    assert (cfg.broker.host, cfg.broker.port, cfg.status_file) == ("broker.lan", 8883, Path("/run/x.json"))
    assert cfg.shared_topics[0] == "$share/edgeguard-ingest/edgeguard/v1/site-b/+/results"
    assert "s3cret" not in repr(cfg) + repr(cfg.broker) and "dbname" not in repr(cfg)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"dsn": "x"}, "ingest.fleet: missing"),
        ({"fleet": "a/b", "dsn": "x"}, "ingest.fleet: must be"),
        ({"fleet": "f", "dsn": "x", "batch_max": 0}, "ingest.batch_max"),
        ({"fleet": "f", "dsn": "x", "batch_max": "10"}, "ingest"),
        ({"fleet": "f", "dsn": "x", "receive_max": 70000}, "ingest.receive_max"),
        ({"fleet": "f", "dsn": "x", "write_method": "insert"}, "ingest.write_method"),
        ({"fleet": "f", "dsn": "x", "flush_interval_s": float("nan")}, "ingest.flush_interval_s"),
        ({"fleet": "f", "dsn": "x", "max_pending_bytes": 100}, "ingest.max_pending_bytes"),
        ({"fleet": "f", "dsn": "x", "nope": 1}, "ingest.nope: unknown key"),
        ({"fleet": "f", "dsn": "x", "broker": {"port": 0}}, "ingest.broker.port"),
        ({"fleet": "f", "dsn": "x", "broker": {"password": "p"}}, "ingest.broker.password: needs a username"),
        ({"fleet": "f", "dsn": "x", "broker": {"client_cert": "c"}}, "ingest.broker.client_cert"),
    ],
)
def test_bad_config_names_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_config(table)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeguard", "fleet", "ingest", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_cli_bad_flag_is_one_line_and_exit_2() -> None:
    run = _cli("--fleet", "f", "--dsn", "dbname=x", "--broker", "nohostport")
    assert run.returncode == 2 and run.stderr == "edgeguard: --broker 'nohostport': expected HOST:PORT\n"
    run = _cli("--dsn", "dbname=x")
    assert run.returncode == 2 and "ingest.fleet: missing" in run.stderr and run.stderr.count("\n") == 1


def test_cli_status_reads_the_file_and_says_what_is_wrong_first(tmp_path: Path) -> None:
    status = tmp_path / "s.json"
    status.write_text(
        json.dumps(
            {
                "state": "ok",
                "reason": None,
                "time": time.time(),
                "pending": 0,
                "lag_s": 0.0,
                "counters": {"inserted": 5},
            }
        )
    )
    run = _cli("--status", "--status-file", str(status))
    assert run.returncode == 0 and run.stdout.splitlines()[0] == "ok"
    status.write_text(json.dumps({"state": "ok", "time": time.time() - 3600}))
    run = _cli("--status", "--status-file", str(status), "--json")
    assert run.returncode == 1 and json.loads(run.stdout)["state"] == "stale"
    link = tmp_path / "link.json"
    os.symlink(status, link)
    run = _cli("--status", "--status-file", str(link))
    assert run.returncode == 2 and run.stderr.startswith("edgeguard: status file ")  # links are not followed
    run = _cli("--status", "--status-file", str(tmp_path / "missing.json"))
    assert run.returncode == 2 and run.stderr.count("\n") == 1


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    from edgeguard.fleet.ingest._config import BrokerConfig, IngestConfig

    example = REPO / "examples" / "ingest.toml"
    cfg = load_ingest_config(example)
    assert cfg.fleet == "site-b" and cfg.broker.port == 8883
    text = example.read_text()
    doc = (REPO / "docs" / "ingest.md").read_text()
    for name in [f.name for f in dataclasses.fields(IngestConfig)] + [
        f.name for f in dataclasses.fields(BrokerConfig)
    ]:
        if name != "broker":
            assert name in text, f"{name} missing from examples/ingest.toml"
            assert f"`{name}`" in doc, f"{name} missing from docs/ingest.md"
